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
