"""Masks and boxes drawn over the image, for people who would rather look than read JSON."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import InputError
from .rle import rle_to_mask

PALETTE = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                    [145, 30, 180], [70, 240, 240], [240, 50, 230]], dtype=np.float32)


def draw_overlay(rgb: np.ndarray, result: dict, alpha: float = 0.45) -> np.ndarray:
    """``rgb``: ``(H, W, 3)`` uint8 (``processing.display_image``); ``result``: the JSON of
    ``egx predict``/``egx query`` (COCO-RLE masks and XYXY pixel boxes of the same image).
    Returns a new ``(H, W, 3)`` uint8 image: masks blended in colour, boxes outlined."""
    import cv2

    out = rgb.astype(np.float32)
    h, w = rgb.shape[:2]
    for i, rle in enumerate(result.get("masks", [])):
        mask = rle_to_mask(rle)
        if mask.shape != (h, w):
            raise InputError(f"mask {i} is {mask.shape[1]}x{mask.shape[0]} but the image is {w}x{h}")
        out[mask] = (1 - alpha) * out[mask] + alpha * PALETTE[i % len(PALETTE)]
    out = np.round(out).astype(np.uint8)
    thickness = max(1, round(max(h, w) / 400))
    for i, box in enumerate(result.get("boxes", [])):
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        colour = tuple(int(c) for c in PALETTE[i % len(PALETTE)])
        cv2.rectangle(out, (x0, y0), (max(x0, x1 - 1), max(y0, y1 - 1)), colour, thickness)
    return out


def write_overlay(path: str | Path, rgb: np.ndarray, result: dict) -> Path:
    import cv2

    path = Path(path)
    image = draw_overlay(rgb, result)
    if not cv2.imwrite(str(path), image[:, :, ::-1]):
        raise InputError(f"cannot write {path}: use a .png or .jpg path in a writable folder")
    return path
