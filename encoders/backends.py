"""The two ways a model runs: a torch module or an onnxruntime session, both numpy in and out.

`Runtime.backend` picks one per encoder: the exported `<vector name>.onnx` when `onnx_dir` holds
it, otherwise the torch module, built only then. torch is imported only on that torch path, so
a worker running on ONNX never loads torch or any torch weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort

if TYPE_CHECKING:
    import torch

    from encoders.base import Backend


def resolve_device(device: str) -> str:
    """ "auto" means CUDA when torch can see a GPU, else CPU."""
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def cpu_batch(device: str, batch_size: int, cpu_best: int) -> int:
    """Chunk size for a model: on CPU big batches overflow the caches and run slower (MobileNet
    on 2 cores: 170 images/s in chunks of 8, 110/s in chunks of 32), so cap them there."""
    return batch_size if device.startswith("cuda") else min(batch_size, cpu_best)


def set_torch_threads(threads: int) -> None:
    """Fix torch's thread pools: on 2 cores oversubscription made torch 5x slower."""
    import torch

    torch.set_num_threads(max(1, threads))
    # Settable once per process, before any parallel work; later calls keep the first value.
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)


def onnx_file(onnx_dir: Path | str, vector_name: str, int8: bool = False) -> Path:
    """Where an encoder's exported model lives: named by its vector name, hence by its version
    (its int8 twin: `<vector name>.int8.onnx`, same vector name, see encoders/onnx.py)."""
    return Path(onnx_dir) / f"{vector_name}{'.int8' if int8 else ''}.onnx"


class TorchBackend:
    def __init__(self, module: torch.nn.Module, input_names: tuple[str, ...], device: str) -> None:
        self.module = module.eval().to(device)
        self.input_names = input_names
        self.device = device

    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        import torch

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
        # "auto" asks onnxruntime, not torch, whether it can use a GPU: torch stays unloaded.
        wants_cuda = device.startswith("cuda") or device == "auto"
        if wants_cuda and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.input_names = tuple(i.name for i in self.session.get_inputs())
        self.path = path
        # Where it really runs (onnxruntime falls back to CPU when CUDA fails to start).
        cuda = "CUDAExecutionProvider" in self.session.get_providers()
        self.device = "cuda" if cuda else "cpu"

    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        feed = {name: inputs[name] for name in self.input_names}
        return self.session.run(None, feed)[0]


@dataclass(frozen=True)
class Runtime:
    """Where the models of one registry build run. `onnx_dir` None: torch only (for export).
    `int8`: prefer an export's int8 twin where there is one."""

    device: str = "auto"
    threads: int = 1
    onnx_dir: Path | str | None = None
    int8: bool = False

    def backend(
        self,
        vector_name: str,
        module: Callable[[], torch.nn.Module],
        input_names: tuple[str, ...],
    ) -> Backend:
        """The exported model when there is one, else `module()` on torch. `module` loads the
        torch weights, so it is called only when no export exists."""
        if self.onnx_dir is not None:
            for int8 in (True, False) if self.int8 else (False,):
                path = onnx_file(self.onnx_dir, vector_name, int8)
                if path.is_file():
                    return OnnxBackend(path, self.device, self.threads)
        set_torch_threads(self.threads)
        return TorchBackend(module(), input_names, resolve_device(self.device))
