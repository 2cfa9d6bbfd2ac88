"""TensorRT runner (TensorRT 10.x/11.x Python API; imported lazily). Device memory and
the stream come from PyTorch's CUDA allocator, so neither pycuda nor cuda-python is needed."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from earthgptx.runner import Runner


class TensorRTRunner(Runner):
    """Feed dict in, feed dict out, through a deserialised engine. ``entry`` is the
    engine's manifest entry; its ``device`` tag must match this machine."""

    def __init__(self, name: str, path: str | Path, entry: dict) -> None:
        self.name = name
        self.path = Path(path)
        self.entry = entry
        self.engine = None
        self.context = None

    def activate(self) -> None:
        import tensorrt as trt

        from .tensorrt_device import TensorRTError, check_device_tag, current_device_tag, tensorrt_problem

        if self.engine is not None:
            return
        if (problem := tensorrt_problem()) is not None:
            raise TensorRTError(f"engine {self.name}: {problem}")
        check_device_tag(self.name, self.entry.get("device", {}), current_device_tag())
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise TensorRTError(f"engine {self.name}: {self.path} could not be deserialised; rebuild it on this device")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]

    def deactivate(self) -> None:
        self.context = None
        self.engine = None

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import tensorrt as trt
        import torch

        if self.engine is None:
            self.activate()
        keep = []
        for name in self.inputs:
            if name not in feed:
                raise KeyError(f"{self.name}: feed lacks input {name!r}")
            dtype = torch.from_numpy(np.empty(0, dtype=trt.nptype(self.engine.get_tensor_dtype(name)))).dtype
            t = torch.from_numpy(np.ascontiguousarray(feed[name])).to("cuda", dtype=dtype)
            if t.numel() == 0:  # TensorRT wants a valid address even for empty tensors
                t = torch.empty(1, dtype=dtype, device="cuda")
            self.context.set_input_shape(name, tuple(feed[name].shape))
            self.context.set_tensor_address(name, t.data_ptr())
            keep.append(t)
        outs = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            dtype = torch.from_numpy(np.empty(0, dtype=trt.nptype(self.engine.get_tensor_dtype(name)))).dtype
            t = torch.empty(shape, dtype=dtype, device="cuda")
            self.context.set_tensor_address(name, t.data_ptr() if t.numel() else torch.empty(1, device="cuda").data_ptr())
            outs[name] = t
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"{self.name}: TensorRT execution failed")
        stream.synchronize()
        return {n: t.float().cpu().numpy() if t.dtype == torch.float16 else t.cpu().numpy() for n, t in outs.items()}
