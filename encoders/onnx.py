"""Export every configured torch encoder to ONNX and prove onnxruntime gives the same vectors.

`export_all(cfg, out_dir)` writes `<out_dir>/<vector name>.onnx` per encoder (for text: the
transformer + pooling + normalisation; tokenisation stays in Python). A file is kept only when
onnxruntime and torch agree to a cosine of at least 1 - 1e-4 on every real input checked
(MovieLens texts and posters when the data set is found, synthesized audio); point
`onnx_dir` at `out_dir` and the registry runs those encoders on onnxruntime, same names.
"""

from __future__ import annotations

import csv
import io
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from encoders.backends import OnnxBackend, TorchBackend, onnx_file, resolve_device
from encoders.base import ModelEncoder
from encoders.registry import build_encoders

if TYPE_CHECKING:
    from fusionrec.settings import EncoderSettings

MIN_COSINE = 1.0 - 1e-4
DEFAULT_DATA = Path("../shared/data/movielens-100k")
OPSET = 17


@dataclass
class ExportResult:
    modality: str
    vector_name: str
    path: Path | None
    inputs: str  # what agreement was checked on
    min_cosine: float
    seconds: float
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.min_cosine >= MIN_COSINE


@dataclass
class ExportReport:
    results: list[ExportResult]

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)

    def __str__(self) -> str:
        lines = [f"{'encoder':<34} {'ok':<4} {'min cosine':>12} {'s':>6}  checked on / file"]
        for r in self.results:
            where = r.error or f"{r.inputs} -> {r.path}"
            mark = "yes" if r.ok else "NO"
            lines.append(
                f"{r.vector_name:<34} {mark:<4} {r.min_cosine:>12.7f} {r.seconds:>6.1f}  {where}"
            )
        return "\n".join(lines)


def export_all(
    cfg: EncoderSettings, out_dir: Path | str, data_dir: Path | str | None = None, n: int = 64
) -> ExportReport:
    """Export each enabled encoder; `data_dir` is MovieLens (default ../shared/data/...)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = Path(data_dir) if data_dir is not None else DEFAULT_DATA
    device = resolve_device(cfg.device)
    results = []
    for modality, encoder in build_encoders(cfg, use_onnx=False).items():
        if not isinstance(encoder, ModelEncoder):
            continue
        inputs, label = sample_inputs(modality, data, n)
        started = time.perf_counter()
        path, cosine, error = None, 0.0, None
        try:
            path, cosine = export_encoder(encoder, inputs, out, device, cfg.threads)
        except Exception as exc:  # one encoder failing to export must not hide the others
            error = f"{type(exc).__name__}: {exc}"
        seconds = time.perf_counter() - started
        results.append(
            ExportResult(modality, encoder.vector_name, path, label, cosine, seconds, error)
        )
    return ExportReport(results)


def export_encoder(
    encoder: ModelEncoder, contents: list[Any], out: Path, device: str, threads: int
) -> tuple[Path, float]:
    """Export one torch encoder; keep the file only if onnxruntime agrees on `contents`."""
    backend = encoder.backend
    if not isinstance(backend, TorchBackend):
        raise TypeError("only torch-backed encoders export")
    prepared = [encoder.prepare(c) for c in contents]
    example = encoder.collate(prepared[:2])
    path = onnx_file(out, encoder.vector_name)
    tmp = path.with_suffix(".tmp.onnx")
    names = list(backend.input_names)
    # Every axis but the trailing feature axes may vary: batch, and tokens for text.
    dynamic = {name: {i: f"{name}_{i}" for i in range(encoder.dynamic_rank)} for name in names}
    dynamic["embedding"] = {0: "batch"}
    module = backend.module.cpu()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer chatter; agreement is checked below instead
        torch.onnx.export(
            module,
            tuple(torch.from_numpy(example[name]) for name in names),
            str(tmp),
            input_names=names,
            output_names=["embedding"],
            dynamic_axes=dynamic,
            opset_version=OPSET,
            dynamo=False,
        )
    backend.module.to(backend.device)
    try:
        expected = encoder.encode(prepared)
        encoder.backend = OnnxBackend(tmp, device, threads)
        got = encoder.encode(prepared)
    finally:
        encoder.backend = backend
    cosine = float(np.min(np.sum(expected * got, axis=1)))  # both are L2-normalised
    if cosine < MIN_COSINE:
        tmp.unlink()
        raise ValueError(f"onnxruntime disagrees with torch: min cosine {cosine:.6f}")
    tmp.replace(path)
    return path, cosine


def sample_inputs(modality: str, data: Path, n: int) -> tuple[list[Any], str]:
    """Real inputs where the data set is present, synthesized otherwise; and what they are."""
    items = data / "items.csv"
    if modality in ("text", "image") and items.is_file():
        with items.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        if modality == "text":
            texts = [f"{r['title']}. {r['description']}".strip() for r in rows[:n]]
            return texts, f"{len(texts)} MovieLens texts"
        posters = [(data / r["poster"]).read_bytes() for r in rows if r["poster"]][:n]
        return posters, f"{len(posters)} MovieLens posters"
    if modality == "text":
        return [f"synthetic sentence number {i} about films" for i in range(n)], "synthetic texts"
    if modality == "image":
        return synthetic_images(n), f"{n} synthetic images"
    return synthetic_audio(min(n, 16)), f"{min(n, 16)} synthetic audio clips"


def synthetic_images(n: int) -> list[bytes]:
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        pixels = rng.integers(0, 256, (int(rng.integers(64, 300)), 200, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def synthetic_audio(n: int, seconds: float = 5.0) -> list[bytes]:
    """WAV clips of tones, chirps and noise at several sample rates and lengths."""
    import soundfile as sf

    rng = np.random.default_rng(0)
    clips = []
    for i in range(n):
        sr = (16_000, 22_050, 44_100, 48_000)[i % 4]
        t = np.arange(int(sr * seconds * (0.5 + rng.random()))) / sr
        tone = np.sin(2 * np.pi * (200 + 800 * rng.random()) * t * (1 + (i % 3) * t))
        clip = 0.4 * tone + (0.2 * (i % 2)) * rng.standard_normal(len(t))
        buf = io.BytesIO()
        sf.write(buf, clip.astype(np.float32), sr, format="WAV")
        clips.append(buf.getvalue())
    return clips
