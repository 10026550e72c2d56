"""Audio encoder: the aiSFX sound-effects CNN (512-d), on WAV/FLAC/OGG (anything libsndfile reads).

Preprocessing follows aiSFX (ISMIR 2022): mono at 44.1 kHz (resampled when needed), peak
normalised, 96-band HTK mel power spectrogram from 2048-sample Hann frames with a 1024 hop,
log10(1e4 * x + 1), divided by the training maximum 9.4578. The CNN embeds blocks of 100
frames (about 2.3 s); a clip's vector is the mean of its block embeddings, L2-normalised.

Choices, since one block costs about 35 ms of CPU on 2 cores:
- blocks do not overlap, and at most `max_blocks` evenly spaced blocks are embedded;
- a clip longer than `max_seconds` is centre-cropped before decoding the rest;
- a clip shorter than one block is zero-padded (the model's own padding: silence);
- a silent clip (peak below -80 dBFS) is an EncodeError, not a vector: every silent item
  would get the same vector and crowd each other's neighbours;
- undecodable bytes, NaN/inf samples or no samples are EncodeErrors.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import soundfile as sf
from scipy.signal import get_window, resample_poly

from encoders.backends import Runtime
from encoders.base import Backend, EncodeError, ModelEncoder, l2_normalise, vector_name

if TYPE_CHECKING:
    import torch

SAMPLE_RATE = 44_100
N_FFT, HOP = 2048, 1024
N_MELS = 96
BLOCK_FRAMES = 100
SPEC_MAX = 9.457798957824707  # aiSFX's 'original' normalisation over its training spectrograms
SILENCE_PEAK = 1e-4  # -80 dBFS
DEFAULT_MAX_SECONDS = 600.0
DEFAULT_MAX_BLOCKS = 8


def htk_mel_filters(n_mels: int = N_MELS, n_fft: int = N_FFT, sr: int = SAMPLE_RATE) -> np.ndarray:
    """(n_fft//2+1, n_mels) triangles in the HTK mel domain, each summing to 1 (Essentia's
    MelBands with warping weighting and unit_sum, as aiSFX was trained)."""

    def mel(f: np.ndarray) -> np.ndarray:
        return 1127.0 * np.log1p(f / 700.0)

    bins = mel(np.arange(n_fft // 2 + 1) * sr / n_fft)
    edges = np.linspace(0.0, float(mel(np.array(sr / 2))), n_mels + 2)
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    tri = np.maximum(0.0, np.minimum((bins - lo) / (mid - lo), (hi - bins) / (hi - mid)))
    return (tri / np.maximum(tri.sum(axis=1, keepdims=True), 1e-12)).T.astype(np.float32)


def decode_audio(data: Any, max_seconds: float) -> tuple[np.ndarray, int]:
    """Raw file bytes -> (mono float32 samples, sample rate), centre-cropped to max_seconds."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise EncodeError(f"audio content must be bytes, got {type(data).__name__}")
    try:
        info = sf.info(io.BytesIO(data))
        keep = int(max_seconds * info.samplerate)
        start = max(0, (info.frames - keep) // 2)
        samples, sr = sf.read(
            io.BytesIO(data), start=start, frames=keep, dtype="float32", always_2d=True
        )
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        reason = getattr(exc, "error_string", None) or str(exc)  # not the BytesIO repr
        raise EncodeError(f"audio is not decodable: {reason}") from exc
    if samples.size == 0:
        raise EncodeError("audio has no samples")
    mono = samples.mean(axis=1)
    if not np.isfinite(mono).all():
        raise EncodeError("audio has NaN or infinite samples")
    return mono, int(sr)


def log_mel_blocks(
    samples: np.ndarray, sr: int, filters: np.ndarray, max_blocks: int
) -> np.ndarray:
    """Mono samples -> (k, BLOCK_FRAMES, N_MELS) normalised log-mel blocks: non-overlapping, at
    most max_blocks, evenly spaced; only the frames of those blocks are computed."""
    if sr != SAMPLE_RATE:
        g = math.gcd(SAMPLE_RATE, sr)
        samples = resample_poly(samples, SAMPLE_RATE // g, sr // g).astype(np.float32)
    peak = float(np.abs(samples).max())
    if peak < SILENCE_PEAK:
        raise EncodeError("audio is silent (peak below -80 dBFS)")
    # Frames are centred on multiples of HOP, the first on sample 0, as Essentia's FrameCutter.
    padded = np.pad(samples / peak, (N_FFT // 2, N_FFT // 2))
    frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP]
    n_blocks = max(1, len(frames) // BLOCK_FRAMES)
    starts = np.linspace(0, n_blocks - 1, min(n_blocks, max_blocks)).round().astype(int)
    index = (starts[:, None] * BLOCK_FRAMES + np.arange(BLOCK_FRAMES)).ravel()
    index = index[index < len(frames)]  # a clip shorter than one block: zero-padded below
    window = get_window("hann", N_FFT, fftbins=False).astype(np.float32)
    power = np.abs(np.fft.rfft(frames[index] * window, axis=1)).astype(np.float32) ** 2
    spec = np.zeros((len(starts) * BLOCK_FRAMES, N_MELS), dtype=np.float32)
    spec[: len(index)] = np.log10(power @ filters * 1e4 + 1.0) / SPEC_MAX
    return spec.reshape(len(starts), BLOCK_FRAMES, N_MELS)


class AudioEncoder(ModelEncoder):
    modality = "audio"

    def __init__(
        self,
        name: str,
        dim: int,
        backend: Backend,
        batch_size: int,
        max_seconds: float = DEFAULT_MAX_SECONDS,
        max_blocks: int = DEFAULT_MAX_BLOCKS,
    ) -> None:
        super().__init__(backend, batch_size)
        self.name = name
        self.dim = dim
        self.max_seconds = max_seconds
        self.max_blocks = max_blocks
        self.filters = htk_mel_filters()

    def prepare(self, content: Any) -> np.ndarray:
        samples, sr = decode_audio(content, self.max_seconds)
        return log_mel_blocks(samples, sr, self.filters, self.max_blocks)

    def collate(self, prepared: Sequence[Any]) -> dict[str, np.ndarray]:
        return {"spectrogram": np.ascontiguousarray(np.concatenate(prepared), dtype=np.float32)}

    def encode(self, prepared: Sequence[Any]) -> np.ndarray:
        # The model's unit of work is a block, so chunks count blocks, not clips.
        blocks = self.collate(prepared)["spectrogram"]
        out = np.concatenate(
            [
                self.backend.run({"spectrogram": blocks[s : s + self.batch_size]})
                for s in range(0, len(blocks), self.batch_size)
            ]
        )
        counts = np.array([len(p) for p in prepared])
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        return l2_normalise(np.add.reduceat(out, starts, axis=0) / counts[:, None])


def build_aisfx_encoder(runtime: Runtime, batch_size: int, max_seconds: float) -> AudioEncoder:
    """The aiSFX CNN: the exported ONNX graph when there is one, else torch."""
    name = "aisfx-v1"

    def module() -> torch.nn.Module:
        from encoders.torch_modules import aisfx_module

        return aisfx_module()

    backend = runtime.backend(vector_name(AudioEncoder.modality, name), module, ("spectrogram",))
    return AudioEncoder(name, 512, backend, batch_size, max_seconds)
