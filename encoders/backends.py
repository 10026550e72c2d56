"""The two ways a model runs: a torch module or an onnxruntime session, both numpy in and out."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch


def resolve_device(device: str) -> str:
    """ "auto" means CUDA when torch can see a GPU, else CPU."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def cpu_batch(device: str, batch_size: int, cpu_best: int) -> int:
    """Chunk size for a model: on CPU big batches overflow the caches and run slower (MobileNet
    on 2 cores: 170 images/s in chunks of 8, 110/s in chunks of 32), so cap them there."""
    return batch_size if device.startswith("cuda") else min(batch_size, cpu_best)


def set_torch_threads(threads: int) -> None:
    """Fix torch's thread pools: on 2 cores oversubscription made torch 5x slower."""
    torch.set_num_threads(max(1, threads))
    # Settable once per process, before any parallel work; later calls keep the first value.
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)


class TorchBackend:
    def __init__(self, module: torch.nn.Module, input_names: tuple[str, ...], device: str) -> None:
        self.module = module.eval().to(device)
        self.input_names = input_names
        self.device = device

    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        args = [torch.from_numpy(inputs[name]).to(self.device) for name in self.input_names]
        with torch.inference_mode():
            return self.module(*args).float().cpu().numpy()


class OnnxBackend:
    def __init__(self, path: Path, device: str, threads: int) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, threads)
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers = ["CPUExecutionProvider"]
        if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.input_names = tuple(i.name for i in self.session.get_inputs())
        self.path = path

    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        feed = {name: inputs[name] for name in self.input_names}
        return self.session.run(None, feed)[0]
