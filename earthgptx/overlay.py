"""Masks and boxes drawn over the image, for people who would rather look than read JSON."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import InputError
from .rle import rle_to_mask

PALETTE = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                    [145, 30, 180], [70, 240, 240], [240, 50, 230]], dtype=np.float32)


PROMPT_COLOUR = (255, 255, 255)  # the user's prompts: white, with a black outline


def draw_overlay(rgb: np.ndarray, result: dict, prompts=None, alpha: float = 0.45) -> np.ndarray:
    """``rgb``: ``(H, W, 3)`` uint8 (``processing.display_image``); ``result``: the JSON of
    ``egx predict``/``egx query`` (COCO-RLE masks and XYXY pixel boxes of the same image);
    ``prompts``: the request's ``processing.VisualPrompts`` (original frame) or None.
    Returns a new ``(H, W, 3)`` uint8 image: masks blended in colour, boxes outlined, prompt
    points as white crosses and prompt boxes as dashed white rectangles, each numbered as
    the ``<regionK>`` it became."""
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
    if prompts is not None:
        _draw_prompts(out, prompts, thickness)
    return out


def _draw_prompts(out: np.ndarray, prompts, thickness: int) -> None:
    import cv2

    h, w = out.shape[:2]
    arm = max(4, round(max(h, w) / 80))
    scale = max(0.4, max(h, w) / 1200)
    k = 0
    for x, y in prompts.points:
        k += 1
        c = (int(round(x)), int(round(y)))
        for colour, t in (((0, 0, 0), thickness + 2), (PROMPT_COLOUR, thickness)):
            cv2.line(out, (c[0] - arm, c[1]), (c[0] + arm, c[1]), colour, t)
            cv2.line(out, (c[0], c[1] - arm), (c[0], c[1] + arm), colour, t)
        _label(out, str(k), (c[0] + arm, c[1] - arm), scale, thickness)
    for box in prompts.boxes:
        k += 1
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        step = 2 * arm
        for a in range(x0, x1, step):  # dashes along the top and bottom edges
            for y in (y0, y1 - 1):
                cv2.line(out, (a, y), (min(a + arm, x1 - 1), y), PROMPT_COLOUR, thickness)
        for a in range(y0, y1, step):
            for x in (x0, x1 - 1):
                cv2.line(out, (x, a), (x, min(a + arm, y1 - 1)), PROMPT_COLOUR, thickness)
        _label(out, str(k), (x0, max(0, y0 - 2)), scale, thickness)


def _label(out: np.ndarray, text: str, at: tuple[int, int], scale: float, thickness: int) -> None:
    import cv2

    cv2.putText(out, text, at, cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), thickness + 2, cv2.LINE_AA)
    cv2.putText(out, text, at, cv2.FONT_HERSHEY_SIMPLEX, scale, PROMPT_COLOUR, thickness, cv2.LINE_AA)


def write_overlay(path: str | Path, rgb: np.ndarray, result: dict, prompts=None) -> Path:
    import cv2

    path = Path(path)
    image = draw_overlay(rgb, result, prompts)
    if not cv2.imwrite(str(path), image[:, :, ::-1]):
        raise InputError(f"cannot write {path}: use a .png or .jpg path in a writable folder")
    return path
