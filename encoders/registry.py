"""Build the configured encoders from the settings object (duck-typed: this package never imports
fusionrec). Models load from local files only.

Which model each setting gives:
- text_model: "minilm-l6-v2" (packaged all-MiniLM-L6-v2, 384-d), any sentence-transformers
  name or local path, or "open_clip" for the text tower of the configured open_clip image model;
- image_model: "mobilenet_v2" (packaged ImageNet weights, 1280-d) or "open_clip:<arch>" with
  image_checkpoint (None: seeded random init, for tests);
- audio_model: "aisfx" (512-d).
Video has no encoder of its own: streams/video.py (PyAV) turns it into key frames for the image
encoder and a sound track for the audio encoder.
An encoder whose `<vector name>.onnx` is in `onnx_dir` (see encoders/onnx.py) runs on
onnxruntime instead of torch, under the same name and with the same vectors (with `int8`: its
`<vector name>.int8.onnx` where there is one, vectors within ~0.01 cosine); its torch model
is then never built (see backends.Runtime), so a worker on ONNX loads neither torch nor its
weights (open_clip's preprocessing still imports torch).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from encoders.audio import DEFAULT_MAX_SECONDS, build_aisfx_encoder
from encoders.backends import Runtime
from encoders.base import Encoder
from encoders.clip import PREFIX as OPEN_CLIP_PREFIX
from encoders.clip import build_open_clip
from encoders.image import DEFAULT_MAX_PIXELS, build_mobilenet_encoder
from encoders.text import build_sentence_encoder

if TYPE_CHECKING:
    from fusionrec.settings import EncoderSettings

MODALITIES = ("text", "image", "audio")


def build_encoders(
    cfg: EncoderSettings,
    *,
    max_image_pixels: int = DEFAULT_MAX_PIXELS,
    max_audio_seconds: float = DEFAULT_MAX_SECONDS,
    use_onnx: bool = True,
) -> dict[str, Encoder]:
    """The enabled encoders keyed by modality. `use_onnx=False` forces torch (for export)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    unknown = sorted(set(cfg.enabled) - set(MODALITIES))
    if unknown:
        raise ValueError(f"unknown modalities {unknown}; known: {list(MODALITIES)}")
    runtime = Runtime(cfg.device, cfg.threads, cfg.onnx_dir if use_onnx else None, cfg.int8)
    clip_text = cfg.text_model == "open_clip"
    if clip_text and not cfg.image_model.startswith(OPEN_CLIP_PREFIX):
        raise ValueError('text_model "open_clip" needs image_model "open_clip:<arch>"')

    encoders: dict[str, Encoder] = {}
    wants_clip = "image" in cfg.enabled or ("text" in cfg.enabled and clip_text)
    if wants_clip and cfg.image_model.startswith(OPEN_CLIP_PREFIX):
        arch = cfg.image_model.removeprefix(OPEN_CLIP_PREFIX)
        image, text = build_open_clip(
            arch, cfg.image_checkpoint, runtime, cfg.batch_size, max_image_pixels
        )
        if "image" in cfg.enabled:
            encoders["image"] = image
        if "text" in cfg.enabled and clip_text:
            encoders["text"] = text
    if "text" in cfg.enabled and not clip_text:
        encoders["text"] = build_sentence_encoder(cfg.text_model, runtime, cfg.batch_size)
    if "image" in cfg.enabled and "image" not in encoders:
        if cfg.image_model != "mobilenet_v2":
            raise ValueError(
                f'unknown image_model {cfg.image_model!r}; use "mobilenet_v2" or "open_clip:<arch>"'
            )
        encoders["image"] = build_mobilenet_encoder(runtime, cfg.batch_size, max_image_pixels)
    if "audio" in cfg.enabled:
        if cfg.audio_model != "aisfx":
            raise ValueError(f'unknown audio_model {cfg.audio_model!r}; use "aisfx"')
        encoders["audio"] = build_aisfx_encoder(runtime, cfg.batch_size, max_audio_seconds)
    return encoders
