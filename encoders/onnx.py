"""Export every configured torch encoder to ONNX and prove onnxruntime gives the same vectors.

`export_all(cfg, out_dir)` writes `<out_dir>/<vector name>.onnx` per encoder (for text: the
transformer + pooling + normalisation; tokenisation stays in Python). A file is kept only when
onnxruntime and torch agree to a cosine of at least 1 - 1e-4 on every real input checked
(MovieLens texts and posters when the data set is found, synthesized audio); point
`onnx_dir` at `out_dir` and the registry runs those encoders on onnxruntime, same names.

A model with matrix products (transformers: the text models, CLIP) also gets an int8 twin,
`<vector name>.int8.onnx`: weights quantized per output channel, activations per batch
(onnxruntime's dynamic quantization), kept when it agrees with torch to a cosine of 0.98. Its
vectors are close to the exact ones, not equal, so it keeps the vector name: stored vectors stay
comparable, and `encoders.int8` switches a deployment either way without re-encoding.
"""

from __future__ import annotations

import csv
import io
import logging
import time
import warnings
from collections.abc import Callable
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
# MiniLM on MovieLens "title. plot": int8 min cosine 0.984, median 0.993, and the text-only
# content baseline did not lose (benchmarks/int8_quality.py).
INT8_MIN_COSINE = 0.98
# Dynamic quantization pays off on matrix products; convolutions run slower (MobileNetV2 on
# 2 cores: 198 -> 68 posters/s, median cosine 0.977), so MobileNet and aisfx get no twin.
INT8_OPS = ("MatMul", "Gemm")
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
    bound: float = MIN_COSINE  # the agreement required
    optional: bool = False  # an int8 twin: without it the exact export serves

    @property
    def ok(self) -> bool:
        return self.error is None and self.min_cosine >= self.bound


@dataclass
class ExportReport:
    results: list[ExportResult]

    @property
    def ok(self) -> bool:
        """Every exact export made (an int8 twin that failed its check is only reported)."""
        return all(r.ok or r.optional for r in self.results)

    def __str__(self) -> str:
        head = f"{'encoder':<34} {'ok':<4} {'min cosine':>12} {'bound':>8} {'s':>6}"
        lines = [f"{head}  checked on / file"]
        for r in self.results:
            where = r.error or f"{r.inputs} -> {r.path}"
            mark = "yes" if r.ok else "NO"
            lines.append(
                f"{r.vector_name:<34} {mark:<4} {r.min_cosine:>12.7f} {r.bound:>8.4f}"
                f" {r.seconds:>6.1f}  {where}"
            )
        return "\n".join(lines)


def export_all(
    cfg: EncoderSettings, out_dir: Path | str, data_dir: Path | str | None = None, n: int = 64
) -> ExportReport:
    """Export each enabled encoder, and its int8 twin where it has matrix products; `data_dir`
    is MovieLens (default ../shared/data/...)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = Path(data_dir) if data_dir is not None else DEFAULT_DATA
    device = resolve_device(cfg.device)
    results = []
    for modality, encoder in build_encoders(cfg, use_onnx=False).items():
        if not isinstance(encoder, ModelEncoder):
            continue
        inputs, label = sample_inputs(modality, data, n)
        check = Agreement(encoder, [encoder.prepare(c) for c in inputs], device, cfg.threads)
        name = encoder.vector_name
        exact = attempt(export_encoder, encoder, check, out)
        results.append(ExportResult(modality, name, inputs=label, **exact))
        path = exact["path"]
        if path is None or not has_ops(path, INT8_OPS):
            continue
        twin = attempt(export_int8, path, check, onnx_file(out, name, int8=True))
        results.append(
            ExportResult(
                modality,
                f"{name} (int8)",
                inputs=label,
                bound=INT8_MIN_COSINE,
                optional=True,
                **twin,
            )
        )
    return ExportReport(results)


def attempt(step: Callable[..., tuple[Path, float]], *args: Any) -> dict[str, Any]:
    """Run one export step, timed: its file and min cosine, or its error (one encoder failing
    to export must not hide the others)."""
    started = time.perf_counter()
    try:
        path, cosine = step(*args)
        error = None
    except Exception as exc:
        path, cosine, error = None, 0.0, f"{type(exc).__name__}: {exc}"
    seconds = time.perf_counter() - started
    return {"path": path, "min_cosine": cosine, "seconds": seconds, "error": error}


class Agreement:
    """How closely an ONNX file reproduces the torch encoder on fixed prepared inputs."""

    def __init__(self, encoder: ModelEncoder, prepared: list[Any], device: str, threads: int):
        self.encoder = encoder
        self.prepared = prepared
        self.device = device
        self.threads = threads
        self.expected = encoder.encode(prepared)

    def min_cosine(self, path: Path) -> float:
        backend = self.encoder.backend
        try:
            self.encoder.backend = OnnxBackend(path, self.device, self.threads)
            got = self.encoder.encode(self.prepared)
        finally:
            self.encoder.backend = backend
        return float(np.min(np.sum(self.expected * got, axis=1)))  # both are L2-normalised

    def keep(self, tmp: Path, path: Path, bound: float) -> tuple[Path, float]:
        """Move `tmp` to `path` if it agrees to `bound`; delete it and raise otherwise."""
        cosine = self.min_cosine(tmp)
        if cosine < bound:
            tmp.unlink()
            raise ValueError(f"onnxruntime disagrees with torch: min cosine {cosine:.6f}")
        tmp.replace(path)
        return path, cosine


def export_encoder(encoder: ModelEncoder, check: Agreement, out: Path) -> tuple[Path, float]:
    """Export one torch encoder; keep the file only if onnxruntime agrees with it."""
    backend = encoder.backend
    if not isinstance(backend, TorchBackend):
        raise TypeError("only torch-backed encoders export")
    example = encoder.collate(check.prepared[:2])
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
    return check.keep(tmp, path, MIN_COSINE)


def has_ops(path: Path, ops: tuple[str, ...]) -> bool:
    import onnx

    return any(node.op_type in ops for node in onnx.load(str(path)).graph.node)


def export_int8(exported: Path, check: Agreement, path: Path) -> tuple[Path, float]:
    """The int8 twin of an exported model, kept if it agrees with torch to INT8_MIN_COSINE."""
    from onnx import TensorProto
    from onnxruntime.quantization import QuantType, quantize_dynamic

    tmp = path.with_suffix(".tmp.onnx")
    # It logs advice to run its pre-processing (shape inference, for static quantization) to
    # the root logger; agreement is checked below instead.
    logging.disable(logging.WARNING)
    try:
        quantize_dynamic(
            str(exported),
            str(tmp),
            per_channel=True,  # per tensor: 5x further from exact (median cosine 0.962)
            weight_type=QuantType.QInt8,
            op_types_to_quantize=list(INT8_OPS),
            # Types shape inference cannot tell are float, as everything in these graphs.
            extra_options={"DefaultTensorType": TensorProto.FLOAT},
        )
    finally:
        logging.disable(logging.NOTSET)
    return check.keep(tmp, path, INT8_MIN_COSINE)


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
