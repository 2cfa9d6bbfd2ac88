import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("EGX_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def data_root() -> Path:
    if not (DATA / "SOURCES.md").is_file():
        pytest.skip(f"shared imagery not found at {DATA} (set EGX_DATA to the folder with SOURCES.md)")
    return DATA


@pytest.fixture(scope="session")
def tiny():
    from earthgptx.config import preset
    from earthgptx.model import build_model

    return build_model(preset("tiny"))


@pytest.fixture(scope="session")
def tiny_predictor(tiny):
    from earthgptx.predictor import Predictor

    model, tokenizer = tiny
    return Predictor.from_model(model, tokenizer)


@pytest.fixture(scope="session")
def tiny_build(tmp_path_factory, data_root):
    """One tiny engine build (ONNX Runtime, FP32) shared by the tests: (folder, reports)."""
    from export.build import BuildOptions, run_build

    out = tmp_path_factory.mktemp("engines") / "tiny"
    reports = run_build(BuildOptions(preset="tiny", out=out, data_root=data_root))
    return out, reports


def _tensorrt_missing() -> str | None:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "TensorRT is not installed on this machine"
    return None


def _gpu_missing() -> str | None:
    import torch

    return None if torch.cuda.is_available() else "no CUDA GPU on this machine"


def pytest_collection_modifyitems(config, items):
    reasons = {"tensorrt": _tensorrt_missing(), "gpu": _gpu_missing()}
    for item in items:
        for marker, reason in reasons.items():
            if reason and marker in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))
