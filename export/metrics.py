"""Agreement metrics between a reduced-precision (or exported) part and its reference,
defined for the degenerate cases, where the textbook formulas divide by zero:

* cosine distance: two zero vectors agree (0); a zero against a non-zero one disagrees (1);
* box IoU: boxes are XYXY edges; two empty boxes (zero area, as the pixel decoder writes for
  an empty mask) agree (IoU 1); an empty against a non-empty box disagrees (IoU 0);
* mask IoU: two empty masks agree (1); an empty against a non-empty one disagrees (0);
* box sets (grounding answers): each reference box matched greedily, best IoU first, to one
  other box; unmatched boxes on either side count 0; two empty sets agree (1).

``PARITY_METRICS`` are the per-tensor comparisons an export spec can declare for an output
(``export.specs.Comparison``): each returns a disagreement, 0 when identical."""
from __future__ import annotations

from typing import Callable

import numpy as np

from earthgptx.evaluation import metrics as evaluation_metrics


def max_abs(a: np.ndarray, b: np.ndarray) -> float:
    """Max ``|a - b|`` over all elements (0 for empty tensors)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b))) if a.size else 0.0


def cosine_distance(a: np.ndarray, b: np.ndarray) -> float:
    """``1 - cos`` of the flattened tensors; 0 for two zero tensors, 1 for one zero tensor."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        return 0.0 if na == nb else 1.0
    return float(1.0 - (a @ b) / (na * nb))


def _area(b: np.ndarray) -> np.ndarray:
    return np.clip(b[..., 2] - b[..., 0], 0, None) * np.clip(b[..., 3] - b[..., 1], 0, None)


def box_iou(a, b) -> float:
    """IoU of two XYXY boxes: 1 for two empty boxes, 0 for an empty and a non-empty one."""
    return float(box_ious(np.asarray(a, np.float64)[None], np.asarray(b, np.float64)[None])[0])


def box_ious(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Element-wise IoU of boxes ``(..., 4)`` XYXY (same shapes), degenerate cases as above."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    ix = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    iy = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = ix * iy
    area_a, area_b = _area(a), _area(b)
    union = area_a + area_b - inter
    both_empty = (area_a == 0) & (area_b == 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)
    return np.where(both_empty, 1.0, iou)


def box_disagreement(a: np.ndarray, b: np.ndarray) -> float:
    """Worst ``1 - IoU`` over boxes ``(..., 4)`` XYXY (0 when there are none)."""
    ious = box_ious(a, b)
    return float(1.0 - ious.min()) if ious.size else 0.0


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two ``(H, W)`` bool masks: 1 when both are empty (``egx eval``'s definition)."""
    return float(evaluation_metrics.mask_iou(a, b)[2])


def box_set_iou(ref: np.ndarray, test: np.ndarray) -> float:
    """Agreement of two sets of XYXY boxes ``(K, 4)``, ``(L, 4)``: greedy one-to-one matching
    by IoU, summed and divided by ``max(K, L)``; 1 for two empty sets."""
    ref, test = np.asarray(ref, np.float64).reshape(-1, 4), np.asarray(test, np.float64).reshape(-1, 4)
    n = max(len(ref), len(test))
    if n == 0:
        return 1.0
    if not len(ref) or not len(test):
        return 0.0
    ious = box_ious(ref[:, None, :], test[None, :, :])
    total = 0.0
    for _ in range(min(len(ref), len(test))):
        i, j = np.unravel_index(np.argmax(ious), ious.shape)
        total += ious[i, j]
        ious[i, :], ious[:, j] = -1, -1
    return float(total / n)


def summarize(values: list[float]) -> dict | None:
    """``{"n", "mean", "worst", "p5"}`` of agreement values (higher is better); the 5th
    percentile is an observed value (``lower``), so with 30 values it is the second worst."""
    if not values:
        return None
    v = np.asarray(values, np.float64)
    return {"n": int(v.size), "mean": float(v.mean()), "worst": float(v.min()),
            "p5": float(np.percentile(v, 5, method="lower"))}


PARITY_METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "max_abs": max_abs,
    "cosine": cosine_distance,
    "box_iou": box_disagreement,
}
