"""CLIP-family encoders through open_clip: an image tower and a text tower in one space.

Configure `image_model = "open_clip:<arch>"` with `image_checkpoint` a local .pt file. With
`text_model = "open_clip"` the registry builds the text encoder from the same model's text
tower, and only then do text and image vectors share a space (true cross-modal matching: a
text query finds images). Both encoders then carry the same name, e.g.
`text.openclip-vit-b-32-laion2b` and `image.openclip-vit-b-32-laion2b`.

No CLIP weights are reachable offline here, so `image_checkpoint = None` gives a random init
seeded with 0: deterministic, fine for tests, meaningless as features.

Name, dimension, image transform and tokenizer come from the architecture's config alone, so
towers with ONNX exports never build the open_clip model; one model serves both torch towers.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np

from encoders.backends import Runtime, cpu_batch
from encoders.base import vector_name
from encoders.image import ImageEncoder
from encoders.text import TextEncoder, model_slug

PREFIX = "open_clip:"


def clip_name(arch: str, checkpoint: str | None) -> str:
    stem = model_slug(Path(checkpoint).stem) if checkpoint else "random"
    return f"openclip-{model_slug(arch)}-{stem}"


def build_open_clip(
    arch: str, checkpoint: str | None, runtime: Runtime, batch_size: int, max_pixels: int
) -> tuple[ImageEncoder, TextEncoder]:
    """Both towers of one open_clip model; weights load from `checkpoint` only (offline)."""
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2

    config = open_clip.get_model_config(arch)
    if config is None:
        raise ValueError(f"unknown open_clip architecture {arch!r}")
    dim = int(config["embed_dim"])
    name = clip_name(arch, checkpoint)
    side = config["vision_cfg"]["image_size"]
    side = side[0] if isinstance(side, tuple | list) else side
    # open_clip's own eval transform for a model loaded from a file (no pretrained tag): its
    # defaults at the model's image size.
    preprocess = image_transform_v2(PreprocessCfg(size=config["vision_cfg"]["image_size"]), False)

    def transform(img: object) -> np.ndarray:
        return preprocess(img).numpy()

    tokenizer = open_clip.get_tokenizer(arch)
    context = int(getattr(tokenizer, "context_length", 77))

    def tokenize(texts: list[str]) -> dict[str, np.ndarray]:
        return {"text": tokenizer(texts).numpy().astype(np.int64)}

    # open_clip has imported torch already (its transforms and tokenizer use it); the model
    # itself is built only for a tower without an export, and once for both.
    from encoders import torch_modules

    model = cache(lambda: torch_modules.open_clip_model(arch, checkpoint))
    image_backend = runtime.backend(
        vector_name(ImageEncoder.modality, name),
        lambda: torch_modules.Tower(model(), "encode_image"),
        ("pixels",),
    )
    image = ImageEncoder(
        name,
        dim,
        transform,
        image_backend,
        cpu_batch(image_backend.device, batch_size, 8),
        max_pixels,
        draft_size=int(side),
    )
    text_backend = runtime.backend(
        vector_name(TextEncoder.modality, name),
        lambda: torch_modules.Tower(model(), "encode_text"),
        ("text",),
    )
    text = TextEncoder(name, dim, tokenize, text_backend, batch_size, max_chars=64 * context)
    return image, text
