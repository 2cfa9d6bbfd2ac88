"""A few small real images shipped with the package, so that a machine without
``../shared/data`` can build and check engines (``export/parity.py``) and try ``egx predict``.
Only images whose licence allows redistribution; their sources and licences are in
``README.md`` beside them. There is no infrared image: none of the infrared datasets in
``../shared/data`` has a licence that allows it."""
from __future__ import annotations

from pathlib import Path

SAMPLES_DIR = Path(__file__).resolve().parent
SAMPLES = (("optical_road_1019.jpg", "optical"), ("sar_mstar_t72_70001.jpeg", "sar"))


def sample_images() -> list[tuple[Path, str]]:
    """``(path, modality)`` of each shipped image."""
    return [(SAMPLES_DIR / name, modality) for name, modality in SAMPLES]
