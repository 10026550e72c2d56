"""Encoders on real weights and real MovieLens inputs: vectors, robustness, ONNX, CLIP."""

from __future__ import annotations

import csv
import io
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from encoders import torch_modules
from encoders.audio import build_aisfx_encoder
from encoders.backends import Runtime, TorchBackend
from encoders.base import EncodeError, Encoder
from encoders.onnx import (
    INT8_MIN_COSINE,
    MIN_COSINE,
    ExportReport,
    ExportResult,
    export_all,
    synthetic_audio,
)
from encoders.registry import build_encoders
from fusionrec.settings import EncoderSettings

DATA = Path(__file__).resolve().parents[1] / "../shared/data/movielens-100k"
needs_data = pytest.mark.skipif(not (DATA / "items.csv").is_file(), reason=f"no data at {DATA}")


@pytest.fixture(scope="module")
def encoders() -> dict[str, Encoder]:
    return build_encoders(EncoderSettings(threads=2, batch_size=8))


@pytest.fixture(scope="module")
def posters() -> list[bytes]:
    if not (DATA / "posters").is_dir():
        pytest.skip(f"no MovieLens posters at {DATA}")
    return [(DATA / "posters" / f"{i}.jpg").read_bytes() for i in (1, 2, 56)]


def encode_one(encoder: Encoder, content: object) -> np.ndarray:
    (result,) = encoder.encode_batch([content])
    assert isinstance(result, np.ndarray), result
    return result


def cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b)


def image_bytes(img: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height; Pillow refuses or we do before decoding."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body)
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def wav(samples: np.ndarray, sr: int, fmt: str = "WAV") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples.astype(np.float32), sr, format=fmt)
    return buf.getvalue()


def tone(seconds: float, sr: int, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return 0.5 * np.sin(2 * np.pi * freq * t)


def test_registry_builds_names_and_dims(encoders: dict[str, Encoder]) -> None:
    expected = {"text": ("minilm-l6-v2", 384), "image": ("mobilenet-v2", 1280)}
    expected["audio"] = ("aisfx-v1", 512)
    assert {m: (e.name, e.dim) for m, e in encoders.items()} == expected
    assert encoders["text"].vector_name == "text.minilm-l6-v2"


def test_registry_builds_only_enabled_and_refuses_unknown() -> None:
    only_audio = build_encoders(EncoderSettings(enabled=["audio"], threads=2))
    assert list(only_audio) == ["audio"]
    with pytest.raises(ValueError, match="unknown modalities"):
        build_encoders(EncoderSettings(enabled=["smell"]))
    with pytest.raises(ValueError, match="image_model"):
        build_encoders(EncoderSettings(enabled=["image"], image_model="resnet"))


def test_text_vectors_and_similarity(encoders: dict[str, Encoder]) -> None:
    texts = [
        "A cowboy doll is jealous when a new spaceman action figure becomes the favourite toy.",
        "Toys come to life and compete for a child's attention when a new figure arrives.",
        "The central bank raised interest rates and the stock market fell sharply.",
    ]
    vectors = encoders["text"].encode_batch(texts)
    for v in vectors:
        assert isinstance(v, np.ndarray) and v.dtype == np.float32 and v.shape == (384,)
        assert abs(np.linalg.norm(v) - 1.0) < 1e-5
    a, b, c = vectors
    assert cos(a, b) > cos(a, c) + 0.3


def test_text_bad_items_fail_alone(encoders: dict[str, Encoder]) -> None:
    results = encoders["text"].encode_batch(["  ", None, "a good title", b"bytes"])
    kinds = [type(r).__name__ for r in results]
    assert kinds == ["EncodeError", "EncodeError", "ndarray", "EncodeError"]


def test_text_batched_equals_single(encoders: dict[str, Encoder]) -> None:
    texts = [f"film number {i} " + "with a longer plot " * i for i in range(20)]
    batched = encoders["text"].encode_batch(texts)
    assert np.allclose(batched[7], encode_one(encoders["text"], texts[7]), atol=1e-5)


def test_poster_vectors(encoders: dict[str, Encoder], posters: list[bytes]) -> None:
    image = encoders["image"]
    first, again, second, third = image.encode_batch([posters[0], posters[0], *posters[1:]])
    assert first.shape == (1280,) and first.dtype == np.float32
    assert abs(np.linalg.norm(first) - 1.0) < 1e-5
    assert np.array_equal(first, again)
    assert cos(first, second) < 0.99 and cos(second, third) < 0.99


def test_bad_images_fail_alone(encoders: dict[str, Encoder], posters: list[bytes]) -> None:
    bad = {
        "truncated": posters[0][: len(posters[0]) // 2],
        "not an image": b"<html>not an image</html>",
        "empty": b"",
        "not bytes": "posters/1.jpg",
        "over our pixel cap": png_header(8000, 6000),
        "pillow bomb": png_header(20000, 10000),
    }
    results = encoders["image"].encode_batch([posters[0], *bad.values(), posters[1]])
    assert isinstance(results[0], np.ndarray) and isinstance(results[-1], np.ndarray)
    for reason, result in zip(bad, results[1:-1], strict=True):
        assert isinstance(result, EncodeError), reason
    assert "cap" in str(results[5])


def test_pillow_bomb_error_becomes_encode_error() -> None:
    from encoders.image import build_mobilenet_encoder

    lax = build_mobilenet_encoder(
        Runtime("cpu"), 8, max_pixels=10**12
    )  # only Pillow's own check left
    (result,) = lax.encode_batch([png_header(20000, 10000)])
    assert isinstance(result, EncodeError) and "bomb" in str(result)


def test_image_modes_become_rgb(encoders: dict[str, Encoder], posters: list[bytes]) -> None:
    image = encoders["image"]
    rgb = Image.open(io.BytesIO(posters[0])).convert("RGB")
    reference = encode_one(image, posters[0])
    opaque = rgb.copy()
    opaque.putalpha(255)
    assert cos(encode_one(image, image_bytes(opaque, "PNG")), reference) > 0.9999
    cmyk = encode_one(image, image_bytes(rgb.convert("CMYK"), "JPEG", quality=95))
    assert cos(cmyk, reference) > 0.95
    palette = encode_one(
        image, image_bytes(rgb.convert("P", palette=Image.Palette.ADAPTIVE), "PNG")
    )
    assert cos(palette, reference) > 0.95
    # Transparent pixels read as white, whatever colour they store.
    clear = Image.new("RGBA", (64, 64), (255, 0, 0, 0))
    white = Image.new("RGB", (64, 64), (255, 255, 255))
    assert (
        cos(
            encode_one(image, image_bytes(clear, "PNG")),
            encode_one(image, image_bytes(white, "PNG")),
        )
        > 0.9999
    )
    grey16 = Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16))
    assert encode_one(image, image_bytes(grey16, "PNG")).shape == (1280,)


def test_animated_image_uses_first_frame(encoders: dict[str, Encoder]) -> None:
    red, blue = Image.new("RGB", (64, 64), (200, 0, 0)), Image.new("RGB", (64, 64), (0, 0, 200))
    gif = image_bytes(red, "GIF", save_all=True, append_images=[blue], duration=100, loop=0)
    image = encoders["image"]
    assert cos(encode_one(image, gif), encode_one(image, image_bytes(red, "GIF"))) > 0.9999


def test_audio_vectors_resampling_and_formats(encoders: dict[str, Encoder]) -> None:
    audio = encoders["audio"]
    at_44k = encode_one(audio, wav(tone(3.0, 44_100), 44_100))
    assert at_44k.shape == (512,) and at_44k.dtype == np.float32
    assert abs(np.linalg.norm(at_44k) - 1.0) < 1e-5
    # Resampled to the model's 44.1 kHz: the same tone stays closer than a different sound.
    # (Pure tones are the hard case: resampling residue shows in the log-mel's empty bands.)
    other_tone = encode_one(audio, wav(tone(3.0, 44_100, 2_000.0), 44_100))
    noise = encode_one(audio, wav(np.random.default_rng(0).uniform(-0.5, 0.5, 132_300), 44_100))
    assert cos(at_44k, other_tone) < 0.93 and cos(at_44k, noise) < 0.8
    for sr in (16_000, 22_050, 48_000):
        assert cos(encode_one(audio, wav(tone(3.0, sr), sr)), at_44k) > 0.95, sr
    flac = encode_one(audio, wav(tone(3.0, 44_100), 44_100, "FLAC"))
    assert cos(flac, at_44k) > 0.999
    ogg = encode_one(audio, wav(tone(3.0, 44_100), 44_100, "OGG"))
    assert cos(ogg, at_44k) > 0.99


def test_audio_edge_cases(encoders: dict[str, Encoder]) -> None:
    audio = encoders["audio"]
    silent, garbage = wav(np.zeros(44_100), 44_100), b"RIFF....WAVEjunk"
    short = wav(tone(0.05, 44_100), 44_100)  # far shorter than one 2.3 s block: zero-padded
    results = audio.encode_batch([silent, garbage, short, b""])
    assert isinstance(results[0], EncodeError) and "silent" in str(results[0])
    assert isinstance(results[1], EncodeError) and isinstance(results[3], EncodeError)
    assert isinstance(results[2], np.ndarray) and results[2].shape == (512,)


def test_long_audio_is_cropped() -> None:
    audio = build_aisfx_encoder(Runtime("cpu"), 8, max_seconds=4.0)
    # 20 s: a quiet tone, then 4 s of a different loud tone in the middle; only the middle stays.
    clip = 0.05 * tone(20.0, 22_050, 300.0)
    clip[8 * 22_050 : 12 * 22_050] = tone(4.0, 22_050, 2_000.0)
    middle = encode_one(audio, wav(tone(4.0, 22_050, 2_000.0), 22_050))
    assert cos(encode_one(audio, wav(clip, 22_050)), middle) > 0.999


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("onnx")
    report = export_all(EncoderSettings(threads=2), out, data_dir=DATA, n=24)
    assert report.ok, str(report)
    assert "text.minilm-l6-v2" in str(report)
    return out


def movielens_texts(n: int) -> list[str]:
    if not (DATA / "items.csv").is_file():
        return []
    with (DATA / "items.csv").open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))[-n:]  # not the rows the export checked
    return [f"{r['title']}. {r['description']}" for r in rows]


def no_torch_models(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any torch model built from here on fails the test: an ONNX export must be enough."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a torch model was built although its ONNX export exists")

    for loader in ("sentence_module", "mobilenet_module", "aisfx_module", "open_clip_model"):
        monkeypatch.setattr(torch_modules, loader, refuse)
    monkeypatch.setattr(TorchBackend, "__init__", refuse)


def test_onnx_build_never_builds_torch_and_gives_the_same_vectors(
    encoders: dict[str, Encoder],
    onnx_dir: Path,
    posters: list[bytes],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    no_torch_models(monkeypatch)
    fast = build_encoders(EncoderSettings(threads=2, batch_size=8, onnx_dir=onnx_dir))
    assert {m: (e.vector_name, e.dim) for m, e in fast.items()} == {
        m: (e.vector_name, e.dim) for m, e in encoders.items()
    }
    assert all(type(e.backend).__name__ == "OnnxBackend" for e in fast.values())
    inputs = {
        "text": [
            "Two cops chase a thief",
            "A quiet drama about grief " * 10,
            "",
            *movielens_texts(16),
        ],
        "image": [*posters, b"junk"],
        "audio": [*synthetic_audio(3), b"junk"],
    }
    for modality, contents in inputs.items():
        slow_out = encoders[modality].encode_batch(contents)
        fast_out = fast[modality].encode_batch(contents)
        for s, f in zip(slow_out, fast_out, strict=True):
            if isinstance(s, EncodeError):
                assert isinstance(f, EncodeError)
            else:
                assert cos(s, f) >= MIN_COSINE


def test_int8_twins_are_made_for_transformers_and_stay_close(
    onnx_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The export quantizes the text model (matrix products), not the convolutional ones; with
    `int8` the registry runs the twin under the same vector name, close to the exact vectors."""
    assert [p.name for p in onnx_dir.glob("*.int8.onnx")] == ["text.minilm-l6-v2.int8.onnx"]
    no_torch_models(monkeypatch)
    exact = build_encoders(EncoderSettings(threads=2, onnx_dir=onnx_dir))
    int8 = build_encoders(EncoderSettings(threads=2, onnx_dir=onnx_dir, int8=True))
    assert {m: e.vector_name for m, e in int8.items()} == {
        m: e.vector_name for m, e in exact.items()
    }
    runs = {m: e.backend.path.name for m, e in int8.items()}  # type: ignore[attr-defined]
    assert runs == {
        "text": "text.minilm-l6-v2.int8.onnx",
        "image": "image.mobilenet-v2.onnx",
        "audio": "audio.aisfx-v1.onnx",
    }
    texts = movielens_texts(32) or [f"a film about {w}" for w in ("cops", "grief", "space")]
    a = np.stack(exact["text"].encode_batch(texts))
    b = np.stack(int8["text"].encode_batch(texts))
    cosines = np.sum(a * b, axis=1)
    assert cosines.min() >= INT8_MIN_COSINE
    assert np.median(cosines) < 0.9999  # really quantized, not the exact model again


def test_an_int8_twin_that_fails_its_check_does_not_fail_the_export() -> None:
    exact = ExportResult("text", "text.m", Path("text.m.onnx"), "texts", 1.0, 1.0)
    twin = ExportResult(
        "text", "text.m (int8)", None, "texts", 0.9, 1.0, bound=INT8_MIN_COSINE, optional=True
    )
    assert not twin.ok and ExportReport([exact, twin]).ok
    assert "NO" in str(ExportReport([exact, twin]))
    broken = ExportResult("image", "image.m", None, "posters", 0.0, 1.0, error="boom")
    assert not ExportReport([exact, twin, broken]).ok


def test_onnx_worker_process_never_imports_torch(onnx_dir: Path) -> None:
    """What a worker pays at startup: a fresh process on exports alone loads no torch at all."""
    code = (
        "import json, sys\n"
        "from encoders.registry import build_encoders\n"
        "from fusionrec.settings import EncoderSettings\n"
        f"built = build_encoders(EncoderSettings(onnx_dir={str(onnx_dir)!r}))\n"
        "names = {m: type(e.backend).__name__ for m, e in built.items()}\n"
        "print(json.dumps([names, 'torch' in sys.modules]))\n"
    )
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr[-3000:]
    names, torch_loaded = json.loads(run.stdout.strip().splitlines()[-1])
    assert set(names.values()) == {"OnnxBackend"} and len(names) == 3
    assert not torch_loaded


@needs_data
def test_text_vectors_equal_sentence_transformers(encoders: dict[str, Encoder]) -> None:
    """Our tokenizer setup (shared by torch and ONNX) gives sentence-transformers' own vectors."""
    texts = [*movielens_texts(8), "ÉCOLE Ünïcode 中文", "word " * 300]
    st = encoders["text"].backend.module.model  # the SentenceTransformer on the torch path
    expected = st.encode(texts, batch_size=8, normalize_embeddings=True)
    got = np.stack(encoders["text"].encode_batch(texts))
    assert np.min(np.sum(expected * got, axis=1)) >= MIN_COSINE


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny open_clip architecture so the CLIP path runs in a second (real code, no weights)."""
    import open_clip

    folder = tmp_path_factory.mktemp("clip_cfg")
    config = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
        "text_cfg": {
            "context_length": 77,
            "vocab_size": 49408,
            "width": 64,
            "heads": 2,
            "layers": 2,
        },
    }
    (folder / "tiny-test-clip.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder)
    return "tiny-test-clip"


def test_open_clip_towers_share_a_space(
    tiny_clip: str, posters: list[bytes], tmp_path: Path
) -> None:
    cfg = EncoderSettings(
        enabled=["text", "image"], text_model="open_clip", image_model=f"open_clip:{tiny_clip}"
    )
    built = build_encoders(cfg)
    text, image = built["text"], built["image"]
    assert text.name == image.name == "openclip-tiny-test-clip-random"
    assert text.dim == image.dim == 32
    t = encode_one(text, "a poster of a cowboy toy")
    i = encode_one(image, posters[0])
    assert t.shape == i.shape == (32,) and abs(np.linalg.norm(i) - 1.0) < 1e-5
    again = build_encoders(cfg)["image"]  # seeded random init: same vectors in every process
    assert np.allclose(encode_one(again, posters[0]), i, atol=1e-6)

    import torch

    checkpoint = tmp_path / "tiny-ckpt.pt"
    torch.save(image.backend.module.model.state_dict(), checkpoint)
    from_file = build_encoders(cfg.model_copy(update={"image_checkpoint": str(checkpoint)}))
    assert from_file["image"].name == "openclip-tiny-test-clip-tiny-ckpt"
    assert np.allclose(encode_one(from_file["image"], posters[0]), i, atol=1e-5)


def test_open_clip_towers_on_onnx_never_build_the_model(
    tiny_clip: str, posters: list[bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = EncoderSettings(
        enabled=["text", "image"],
        text_model="open_clip",
        image_model=f"open_clip:{tiny_clip}",
        threads=2,
    )
    torch_built = build_encoders(cfg)
    assert export_all(cfg, tmp_path, data_dir=DATA, n=4).ok
    no_torch_models(monkeypatch)
    fast = build_encoders(cfg.model_copy(update={"onnx_dir": tmp_path}))
    texts = ["a poster of a cowboy toy", *movielens_texts(3)]
    for modality, contents in {"text": texts, "image": posters}.items():
        assert fast[modality].vector_name == torch_built[modality].vector_name
        assert fast[modality].dim == torch_built[modality].dim
        slow_out = np.stack(torch_built[modality].encode_batch(contents))
        fast_out = np.stack(fast[modality].encode_batch(contents))
        assert np.min(np.sum(slow_out * fast_out, axis=1)) >= MIN_COSINE


def test_open_clip_text_needs_open_clip_image() -> None:
    with pytest.raises(ValueError, match="open_clip"):
        build_encoders(EncoderSettings(enabled=["text"], text_model="open_clip"))


@needs_data
def test_benchmark_quick_runs(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run(
        [sys.executable, "benchmarks/encoders.py", "--quick", "--data", str(DATA)],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    figures = json.loads(run.stdout.strip().splitlines()[-1])
    keys = ("text_torch_items_per_s", "text_onnx_items_per_s", "text_onnx_int8_items_per_s")
    for key in (*keys, "image_torch_items_per_s"):
        assert figures[key] > 0


@needs_data
def test_int8_quality_benchmark_runs() -> None:
    root = Path(__file__).resolve().parents[1]
    command = [sys.executable, "benchmarks/int8_quality.py", "--data", str(DATA)]
    run = subprocess.run(
        [*command, "--limit-items", "60"], cwd=root, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    figures = json.loads(run.stdout.strip().splitlines()[-1])
    assert figures["items"] == 60
    assert INT8_MIN_COSINE <= figures["cosine_min"] <= figures["cosine_median"] < 1.0
