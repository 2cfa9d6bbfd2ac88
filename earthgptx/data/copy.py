"""A smaller copy of a data root in the same layout (``egx data --copy-to``), for moving the
training data to another machine (a GPU box that takes a limited upload).

Images larger than ``max_side`` are downscaled by area averaging; their masks likewise,
keeping every pixel an object covers at all (small infrared targets survive); JPEGs are
re-encoded at ``quality``. Files with pixel coordinates of a downscaled image (Pascal-VOC
xml) are left out, since the readers take objects from the masks; datasets whose objects
are only coordinates (DOTA's ``labelTxt``) are copied unchanged. Training resizes every
image to the model's input (256 px for ``small``), so a copy at ``max_side`` >= 2x that
trains the same model.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from .readers import READERS

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def _is_mask(path: Path) -> bool:
    return path.parent.name == "masks" or path.stem.endswith(("_instance_id_RGB", "_instance_color_RGB"))


def _shrink(data: np.ndarray, max_side: int, mask: bool) -> np.ndarray:
    import cv2

    h, w = data.shape[:2]
    scale = max_side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    if not mask:
        return cv2.resize(data, size, interpolation=cv2.INTER_AREA)
    if data.ndim == 2:
        return (cv2.resize((data > 0).astype(np.float32), size, interpolation=cv2.INTER_AREA) > 0).astype(data.dtype) * data.max()
    # colour masks: each colour keeps the pixels it covers at all (instance colours stay apart)
    out = np.zeros((size[1], size[0], data.shape[2]), dtype=data.dtype)
    colours = np.unique(data.reshape(-1, data.shape[2]), axis=0)
    for c in colours:
        if not c.any():
            continue
        cover = cv2.resize(np.all(data == c, axis=-1).astype(np.float32), size, interpolation=cv2.INTER_AREA) > 0
        out[cover] = c
    return out


def copy_data(src: Path, dst: Path, max_side: int = 640, quality: int = 90) -> dict[str, int]:
    """Copy every dataset folder of ``READERS`` found under ``src`` to ``dst``; returns bytes
    written per dataset."""
    import cv2

    written: dict[str, int] = {}
    for name, (folder, _) in READERS.items():
        root = src / folder
        if not root.is_dir():
            continue
        coordinates_only = (root / "labelTxt").is_dir()
        total = 0
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            out = dst / folder / path.relative_to(root)
            out.parent.mkdir(parents=True, exist_ok=True)
            suffix = path.suffix.lower()
            if suffix not in IMAGE_SUFFIXES or coordinates_only:
                if suffix == ".xml" and not coordinates_only and _resized_image_of(path, root, max_side):
                    continue
                shutil.copyfile(path, out)
            else:
                data = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
                if data is None:
                    shutil.copyfile(path, out)
                else:
                    if max(data.shape[:2]) > max_side:
                        data = _shrink(data, max_side, _is_mask(path))
                    params = [cv2.IMWRITE_JPEG_QUALITY, quality] if suffix in (".jpg", ".jpeg") else \
                        [cv2.IMWRITE_PNG_COMPRESSION, 9]
                    cv2.imwrite(str(out), data, params)
            total += out.stat().st_size
        written[name] = total
    (dst / "SOURCES.md").write_text(f"A copy of {src} made by `egx data --copy-to` (max side {max_side} px, "
                                    f"JPEG quality {quality}); see the original's SOURCES.md for sources and licences.\n")
    return written


def _resized_image_of(xml: Path, root: Path, max_side: int) -> bool:
    """Whether the image that ``xml`` describes is larger than ``max_side`` (its coordinates would be wrong)."""
    import cv2

    for folder in ("images", "."):
        for suffix in IMAGE_SUFFIXES:
            img = root / folder / f"{xml.stem}{suffix}"
            if img.is_file():
                data = cv2.imread(str(img), cv2.IMREAD_UNCHANGED)
                return data is not None and max(data.shape[:2]) > max_side
    return False
