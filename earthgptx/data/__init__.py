"""Training and evaluation data: readers of the annotation layouts in ``../shared/data``
(``readers``), the validation split (``split``), and the instruction builder that turns
annotations into samples of every task level (``instructions``, worded by ``templates``)."""
from __future__ import annotations

import os
from pathlib import Path


def default_data_root() -> Path:
    """``$EGX_DATA``, else ``../shared/data`` beside the repository checkout."""
    return Path(os.environ.get("EGX_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))
