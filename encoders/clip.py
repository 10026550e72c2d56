"""CLIP-family encoders through open_clip: an image tower and a text tower in one space.

Configure `image_model = "open_clip:<arch>"` with `image_checkpoint` a local .pt file. With
`text_model = "open_clip"` the registry builds the text encoder from the same model's text
tower, and only then do text and image vectors share a space (true cross-modal matching: a
text query finds images). Both encoders then carry the same name, e.g.
`text.openclip-vit-b-32-laion2b` and `image.openclip-vit-b-32-laion2b`.

No CLIP weights are reachable offline here, so `image_checkpoint = None` gives a random init
seeded with 0: deterministic, fine for tests, meaningless as features.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from encoders.backends import TorchBackend, cpu_batch
from encoders.image import ImageEncoder
from encoders.text import TextEncoder, model_slug

PREFIX = "open_clip:"


class ImageTower(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels)


class TextTower(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(text)


def clip_name(arch: str, checkpoint: str | None) -> str:
    stem = model_slug(Path(checkpoint).stem) if checkpoint else "random"
    return f"openclip-{model_slug(arch)}-{stem}"


def build_open_clip(
    arch: str, checkpoint: str | None, device: str, batch_size: int, max_pixels: int
) -> tuple[ImageEncoder, TextEncoder]:
    """Both towers of one open_clip model; weights load from `checkpoint` only (offline)."""
    import open_clip

    if checkpoint is not None and not Path(checkpoint).is_file():
        raise FileNotFoundError(f"open_clip checkpoint not found: {checkpoint}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # a random init must give the same vectors in every process
        model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=checkpoint)
    model.eval()
    dim = int(open_clip.get_model_config(arch)["embed_dim"])
    name = clip_name(arch, checkpoint)
    image_size = model.visual.image_size
    side = image_size[0] if isinstance(image_size, tuple | list) else image_size

    def transform(img: object) -> np.ndarray:
        return preprocess(img).numpy()

    tokenizer = open_clip.get_tokenizer(arch)
    context = int(getattr(tokenizer, "context_length", 77))

    def tokenize(texts: list[str]) -> dict[str, np.ndarray]:
        return {"text": tokenizer(texts).numpy().astype(np.int64)}

    image = ImageEncoder(
        name,
        dim,
        transform,
        TorchBackend(ImageTower(model), ("pixels",), device),
        cpu_batch(device, batch_size, 8),
        max_pixels,
        draft_size=int(side),
    )
    text = TextEncoder(
        name,
        dim,
        tokenize,
        TorchBackend(TextTower(model), ("text",), device),
        batch_size,
        max_chars=64 * context,
    )
    return image, text
