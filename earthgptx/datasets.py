"""Readers for the annotation formats of the shared imagery (``../shared/data``):
SIRST (infrared: ``masks/<name>_pixels0.png``, one object per connected component), HRSID (SAR: instance
colour PNGs), DOTA (optical: oriented boxes as 8 corners). Each sample gives the image
path, its modality, and objects as XYXY edge boxes and ``(H, W)`` bool masks in the
original frame. Problems in the data are reported (``warnings``) and skipped, never raised."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import InputError
from .imageio import read_image, read_mask
from .processing import mask_box

log = logging.getLogger(__name__)


@dataclass
class Sample:
    image: Path
    modality: str
    boxes: np.ndarray  # (K, 4) float64 XYXY edges, original frame
    masks: list[np.ndarray] = field(default_factory=list)  # (H, W) bool, one per object, may be empty


def read_dota_polygons(path: Path) -> list[tuple[np.ndarray, str]]:
    """DOTA v1 label file -> ``[(corners (4, 2), class_name), ...]`` (header lines skipped)."""
    out = []
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) < 9:
            continue
        try:
            corners = np.asarray([float(v) for v in parts[:8]]).reshape(4, 2)
        except ValueError:
            continue
        out.append((corners, parts[8]))
    return out


def instance_masks(path: Path) -> list[np.ndarray]:
    """Instance-colour PNG (one colour per instance, black background) -> masks."""
    rgb = read_image(path).data
    if rgb.ndim == 2:
        rgb = rgb[:, :, None]
    flat = rgb.reshape(-1, rgb.shape[2])
    colours = np.unique(flat, axis=0)
    masks = []
    for c in colours:
        if not c.any():
            continue
        masks.append(np.all(rgb == c, axis=-1))
    return masks


def _skip(skipped: list | None, path: Path, why: str) -> None:
    log.warning("%s: %s, skipped", path, why)
    if skipped is not None:
        skipped.append((str(path), why))


def sirst_samples(root: Path, skipped: list | None = None) -> Iterator[Sample]:
    """SIRST layout: ``images/<name>.png`` + ``masks/<name>_pixels0.png``. Problems go to
    ``skipped`` as ``(path, reason)``."""
    for img in sorted((root / "images").glob("*.png")):
        mask_path = root / "masks" / f"{img.stem}_pixels0.png"
        if not mask_path.is_file():
            _skip(skipped, img, "no mask")
            continue
        try:
            mask = read_mask(mask_path)
            shape = read_image(img).data.shape[:2]
        except InputError as exc:
            _skip(skipped, img, str(exc))
            continue
        if mask.shape != shape:
            _skip(skipped, img, f"mask is {mask.shape[1]}x{mask.shape[0]} but image is {shape[1]}x{shape[0]}")
            continue
        import cv2

        n, labels = cv2.connectedComponents(mask.astype(np.uint8))
        masks = [labels == i for i in range(1, n)]
        yield Sample(img, "infrared", np.asarray([mask_box(m) for m in masks]).reshape(-1, 4), masks)


def hrsid_samples(root: Path, skipped: list | None = None) -> Iterator[Sample]:
    """HRSID layout: ``<name>.png`` + ``<name>_instance_id_RGB.png``."""
    for img in sorted(root.glob("*.png")):
        if img.stem.endswith(("_instance_id_RGB", "_instance_color_RGB")):
            continue
        ann = root / f"{img.stem}_instance_id_RGB.png"
        try:
            masks = instance_masks(ann) if ann.is_file() else []
            shape = read_image(img).data.shape[:2]
        except InputError as exc:
            _skip(skipped, img, str(exc))
            continue
        if masks and masks[0].shape != shape:
            _skip(skipped, img, "instance mask size differs from the image")
            continue
        yield Sample(img, "sar", np.asarray([mask_box(m) for m in masks]).reshape(-1, 4), masks)


def dota_samples(root: Path, skipped: list | None = None) -> Iterator[Sample]:
    """DOTA layout: ``images/<name>.png`` + ``labelTxt/<name>.txt``."""
    import cv2

    for img in sorted((root / "images").glob("*.png")):
        label = root / "labelTxt" / f"{img.stem}.txt"
        polys = read_dota_polygons(label) if label.is_file() else []
        try:
            h, w = read_image(img).data.shape[:2]
        except InputError as exc:
            _skip(skipped, img, str(exc))
            continue
        masks, boxes = [], []
        for corners, _ in polys:
            m = np.zeros((h, w), dtype=np.uint8)
            cv2.fillPoly(m, [np.round(corners).astype(np.int32)], 1)
            if m.any():
                masks.append(m.astype(bool))
                boxes.append(mask_box(masks[-1]))
        yield Sample(img, "optical", np.asarray(boxes).reshape(-1, 4), masks)


def shared_samples(data_root: Path, skipped: list | None = None) -> Iterator[Sample]:
    """All samples of ``../shared/data`` (infrared, SAR, optical)."""
    yield from sirst_samples(data_root / "infrared" / "sirst", skipped)
    yield from hrsid_samples(data_root / "sar" / "hrsid", skipped)
    yield from dota_samples(data_root / "optical" / "dota", skipped)
