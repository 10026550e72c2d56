"""The encoder interface: content in, L2-normalised float32 vectors out."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np


class EncodeError(ValueError):
    """One item's content cannot be encoded; the message says why (it becomes a dead-letter
    reason)."""


def l2_normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def vector_name(modality: str, name: str) -> str:
    """The Qdrant vector name: an encoder upgrade writes new vectors beside the old. Known before
    any model loads, since it also names the encoder's ONNX file."""
    return f"{modality}.{name}"


class Encoder(ABC):
    modality: str  # "text" | "image" | "audio"
    name: str  # model family and version, e.g. "minilm-l6-v2"
    dim: int

    @property
    def vector_name(self) -> str:
        return vector_name(self.modality, self.name)

    @abstractmethod
    def prepare(self, content: Any) -> Any:
        """Decode one item's raw content (str for text, bytes for media) into model input.

        Raises EncodeError for content that is not valid for this modality.
        """

    @abstractmethod
    def encode(self, prepared: Sequence[Any]) -> np.ndarray:
        """Encode a batch of prepared inputs to an (n, dim) float32 L2-normalised array."""

    def encode_batch(self, contents: Sequence[Any]) -> list[np.ndarray | EncodeError]:
        """Per-item results: a vector, or the error that item alone gets. One bad item never
        fails the batch."""
        results: list[np.ndarray | EncodeError] = []
        good: list[int] = []
        prepared: list[Any] = []
        for content in contents:
            try:
                prepared.append(self.prepare(content))
                good.append(len(results))
                results.append(EncodeError("not encoded"))
            except EncodeError as exc:
                results.append(exc)
            except Exception as exc:  # decoders raise all sorts; the item, not the batch, fails
                results.append(EncodeError(f"{type(exc).__name__}: {exc}"))
        if prepared:
            vectors = self.encode(prepared)
            for i, v in zip(good, vectors, strict=True):
                results[i] = v
        return results


class Backend(Protocol):
    """Runs a model on a batch of named numpy inputs: torch or onnxruntime, same outputs."""

    input_names: tuple[str, ...]
    device: str  # "cpu" or "cuda...": where it runs, which sets the chunk sizes

    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray: ...


class ModelEncoder(Encoder):
    """An encoder made of per-item `prepare`, batch `collate`, a swappable backend and `finish`.

    The backend is the only part that differs between torch and onnxruntime, so both give
    the same vectors under the same name.
    """

    # Leading input axes that vary between batches (batch; text adds tokens): for ONNX export.
    dynamic_rank = 1

    def __init__(self, backend: Backend, batch_size: int) -> None:
        self.backend = backend
        self.batch_size = max(1, batch_size)

    @abstractmethod
    def collate(self, prepared: Sequence[Any]) -> dict[str, np.ndarray]:
        """Stack prepared items into the backend's named inputs."""

    def finish(self, outputs: np.ndarray, prepared: Sequence[Any]) -> np.ndarray:
        """Turn the backend's outputs for one chunk into (n, dim) vectors."""
        return l2_normalise(outputs)

    def chunks(self, prepared: Sequence[Any]) -> list[list[int]]:
        """Which items run through the backend together; text groups by length."""
        n = len(prepared)
        return [list(range(s, min(s + self.batch_size, n))) for s in range(0, n, self.batch_size)]

    def encode(self, prepared: Sequence[Any]) -> np.ndarray:
        out = np.empty((len(prepared), self.dim), dtype=np.float32)
        for idx in self.chunks(prepared):
            chunk = [prepared[i] for i in idx]
            out[idx] = self.finish(self.backend.run(self.collate(chunk)), chunk)
        return out
