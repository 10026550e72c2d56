"""Image encoders: decoding that refuses bad input item by item, and MobileNetV2 features.

The default is torchvision's MobileNetV2 with the packaged ImageNet weights: 1280-d globally
pooled features of the last conv stage. It is image-only (no text tower): for cross-modal
text-to-image matching configure an open_clip model (see encoders/clip.py).

Decoding rules (each refusal is an EncodeError for that item only):
- the pixel count from the header is checked against `max_pixels` before any pixel is
  decoded (decompression bombs); Pillow's own DecompressionBombError maps to EncodeError too;
- truncated or corrupt files are refused, not half-decoded;
- palette, alpha (composited on white), CMYK, greyscale and 16-bit images become RGB;
- animated images (GIF, WebP, APNG) use their first frame; EXIF orientation is applied.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from encoders.backends import Runtime, cpu_batch
from encoders.base import Backend, EncodeError, ModelEncoder, vector_name

if TYPE_CHECKING:
    import torch

DEFAULT_MAX_PIXELS = 40_000_000

Transform = Callable[[Image.Image], np.ndarray]


def decode_image(data: Any, max_pixels: int, draft_size: int) -> Image.Image:
    """Raw file bytes -> an RGB image, or EncodeError saying why not."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise EncodeError(f"image content must be bytes, got {type(data).__name__}")
    if not data:
        raise EncodeError("image is empty")
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise EncodeError(f"image refused as a decompression bomb: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise EncodeError("not an image (unrecognised format)") from exc
    width, height = img.size
    if width * height > max_pixels:
        raise EncodeError(f"image is {width}x{height}, above the cap of {max_pixels} pixels")
    if width == 0 or height == 0:
        raise EncodeError("image has no pixels")
    # JPEG only: decode at a reduced scale that is still >= draft_size; far less work.
    img.draft("RGB", (draft_size, draft_size))
    try:
        img.load()  # first frame of an animation; raises on truncated data
        img = ImageOps.exif_transpose(img)
        return to_rgb(img)
    except (OSError, SyntaxError, ValueError) as exc:
        raise EncodeError(f"image is truncated or corrupt: {exc}") from exc


def to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Transparent pixels hold arbitrary colour; composite so they read as background.
        rgba = img.convert("RGBA")
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if img.mode.startswith("I") or img.mode == "F":
        # 16/32-bit greyscale: Pillow's convert would clip everything above 255 to white.
        grey = np.asarray(img, dtype=np.float32)
        grey = 255.0 * (grey - grey.min()) / max(float(np.ptp(grey)), 1e-6)
        return Image.fromarray(grey.astype(np.uint8), "L").convert("RGB")
    return img.convert("RGB")


def imagenet_transform(resize: int = 256, crop: int = 224) -> Transform:
    """torchvision's ImageNet eval geometry (resize shorter side, centre crop) as uint8 HWC;
    the model normalises, so preprocessing stays cheap and the input 4x smaller."""

    def transform(img: Image.Image) -> np.ndarray:
        w, h = img.size
        scale = resize / min(w, h)
        size = (max(crop, round(w * scale)), max(crop, round(h * scale)))
        left, top = (size[0] - crop) // 2, (size[1] - crop) // 2
        box = (left / scale, top / scale, (left + crop) / scale, (top + crop) / scale)
        # Resizing only the crop box gives the same pixels as resize-then-crop, for less work.
        img = img.resize((crop, crop), Image.Resampling.BILINEAR, box=box)
        return np.asarray(img, dtype=np.uint8)

    return transform


class ImageEncoder(ModelEncoder):
    modality = "image"

    def __init__(
        self,
        name: str,
        dim: int,
        transform: Transform,
        backend: Backend,
        batch_size: int,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        draft_size: int = 256,
    ) -> None:
        super().__init__(backend, batch_size)
        self.name = name
        self.dim = dim
        self.transform = transform
        self.max_pixels = max_pixels
        self.draft_size = draft_size

    def prepare(self, content: Any) -> np.ndarray:
        return self.transform(decode_image(content, self.max_pixels, self.draft_size))

    def collate(self, prepared: Sequence[Any]) -> dict[str, np.ndarray]:
        return {"pixels": np.stack(prepared)}


def build_mobilenet_encoder(runtime: Runtime, batch_size: int, max_pixels: int) -> ImageEncoder:
    """MobileNetV2 ImageNet features: the exported ONNX graph when there is one, else torch."""
    name = "mobilenet-v2"

    def module() -> torch.nn.Module:
        from encoders.torch_modules import mobilenet_module

        return mobilenet_module()

    backend = runtime.backend(vector_name(ImageEncoder.modality, name), module, ("pixels",))
    # MovieLens posters in chunks of 2 / 4 / 8, images/s over two or three runs on 2 threads:
    # onnxruntime 165-193 / 173-201 / 158-176, torch 81-82 / 72-83 / 56-69; on one thread
    # onnxruntime 114-117 / 108-114 / 104-113. Small chunks keep the activations in cache.
    chunk = cpu_batch(backend.device, batch_size, 2)
    return ImageEncoder(name, 1280, imagenet_transform(), backend, chunk, max_pixels)
