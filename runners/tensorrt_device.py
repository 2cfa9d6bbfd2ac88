"""TensorRT on this machine: whether it can be used (``tensorrt_problem``), the device tag
an engine is built for (TensorRT version, GPU name, compute capability) and the check that
refuses an engine built elsewhere. ``tensorrt`` is imported lazily: this module loads
everywhere. The exporters tag what they build; the TensorRT runner checks the tag."""
from __future__ import annotations

from earthgptx.errors import EarthGPTXError


class TensorRTError(EarthGPTXError):
    """A TensorRT build or engine that cannot be used."""


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


def current_device_tag() -> dict:
    """``{"tensorrt", "gpu", "compute_capability"}`` of this machine (needs TensorRT and a GPU)."""
    import tensorrt as trt
    import torch

    major, minor = torch.cuda.get_device_capability(0)
    return {"tensorrt": trt.__version__, "gpu": torch.cuda.get_device_name(0), "compute_capability": f"{major}.{minor}"}


def check_device_tag(name: str, built: dict, here: dict) -> None:
    """Refuse an engine whose TensorRT version, GPU or compute capability differ from here."""
    diffs = [f"{k}: built with {built.get(k)!r}, this device has {here.get(k)!r}"
             for k in ("tensorrt", "gpu", "compute_capability") if built.get(k) != here.get(k)]
    if diffs:
        raise TensorRTError(f"engine {name} was built for another device ({'; '.join(diffs)}). TensorRT engines are "
                            "not portable: rebuild on this device with python export/build_engines.py --backend tensorrt")
