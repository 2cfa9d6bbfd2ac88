"""TensorRT engines (written against the TensorRT 10.x/11.x Python API; imported lazily)."""
from __future__ import annotations


def tensorrt_problem() -> str | None:
    """Why TensorRT cannot build here, or ``None`` if it can."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return ("TensorRT is not installed: build TensorRT engines on the target device (Jetson: JetPack ships it; "
                "GPU servers: pip install -e '.[gpu]'), or use --backend onnxruntime")
    import torch

    if not torch.cuda.is_available():
        return "TensorRT needs an NVIDIA GPU and none is visible; use --backend onnxruntime"
    return None
