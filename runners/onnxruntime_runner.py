"""ONNX Runtime runner: CPU everywhere (the embedded default); the CUDA and TensorRT
execution providers are used when this onnxruntime build has them."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from earthgptx.errors import EarthGPTXError
from earthgptx.runner import Runner

GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


def choose_providers(device: str = "auto") -> list[str]:
    """Execution providers for ``device``: ``"cpu"``, ``"cuda"`` or ``"auto"`` (CUDA when present).
    The TensorRT EP is used only when asked for (``device="tensorrt"``): it builds engines
    at session start, which takes minutes."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "tensorrt":
        wanted = ["TensorrtExecutionProvider", "CUDAExecutionProvider"]
    else:
        wanted = ["CUDAExecutionProvider"]
    chosen = [p for p in wanted if p in available]
    if device in ("cuda", "tensorrt") and not chosen:
        raise EarthGPTXError(f"this onnxruntime has no GPU provider (has {available}); "
                             "install onnxruntime-gpu (pip install -e '.[gpu]') or use --device cpu")
    return chosen + ["CPUExecutionProvider"]


class OnnxRuntimeRunner(Runner):
    """Feed dict in, feed dict out, through an ``InferenceSession`` on ``path``."""

    def __init__(self, name: str, path: str | Path, device: str = "auto", threads: int | None = None) -> None:
        self.name = name
        self.path = Path(path)
        self.device = device
        self.threads = threads
        self.session = None
        self.unsigned_activations = 0  # Q/DQ nodes rewritten to uint8 activations for the CPU
        self.unsigned_weights = 0  # int8 weights rewritten as uint8 (CPUs whose u8 x s8 kernels saturate)
        self.input_names: list[str] = []
        self.output_names: list[str] = []

    def activate(self) -> None:
        import onnxruntime as ort

        if self.session is not None:
            return
        if not self.path.is_file():
            raise EarthGPTXError(f"{self.name}: engine file {self.path} is missing; rebuild with python export/build_engines.py")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        if self.threads:
            opts.intra_op_num_threads = self.threads
        providers = choose_providers(self.device)
        source = self._cpu_model() if providers == ["CPUExecutionProvider"] else None
        self.session = ort.InferenceSession(source or str(self.path), opts, providers=providers)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def _cpu_model(self) -> bytes | None:
        """The model as ``qdq_cpu.prepare_for_cpu`` leaves it (uint8 activation Q/DQ; uint8
        weights on CPUs whose u8 x s8 kernels saturate; lossless) when the file has anything
        to rewrite, else None (the file is used as is)."""
        import onnx

        from .cpu import u8s8_saturates
        from .qdq_cpu import has_int8_activations, has_int8_weights, prepare_for_cpu

        saturates = u8s8_saturates()
        header = onnx.load(str(self.path), load_external_data=False)
        if not has_int8_activations(header) and not (saturates and has_int8_weights(header)):
            return None
        model = onnx.load(str(self.path))
        counts = prepare_for_cpu(model, saturates)
        self.unsigned_activations, self.unsigned_weights = counts["unsigned_activations"], counts["unsigned_weights"]
        if model.ByteSize() >= 2**31 - 2**20:
            raise EarthGPTXError(f"{self.name}: an INT8 model over 2 GB cannot be rewritten for the CPU in "
                                 "memory; run it with --device cuda or build it with weight-only INT8")
        return model.SerializeToString()

    def deactivate(self) -> None:
        self.session = None

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.session is None:
            self.activate()
        missing = [n for n in self.input_names if n not in feed]
        if missing:
            raise EarthGPTXError(f"{self.name}: feed lacks inputs {missing}")
        outs = self.session.run(None, {n: feed[n] for n in self.input_names})
        return dict(zip(self.output_names, outs))
