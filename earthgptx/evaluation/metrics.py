"""The metrics the field reports, as pure functions of arrays and strings.

* classification: accuracy of the class named in the answer (``class_in_text``);
* captioning: corpus BLEU-4 against all references (sacrebleu, lower-cased, 13a tokens);
* masks: per-image IoU, cumulative IoU (sum of intersections / sum of unions) and mean IoU;
  two empty masks agree (IoU 1);
* infrared small targets (SIRST papers, e.g. DNANet): ``IoU`` cumulative over the set,
  ``nIoU`` the mean of per-image IoUs, ``Pd`` = detected targets / targets where a target
  counts as detected when a predicted connected component's centroid lies within 3 px of
  its centroid, ``Fa`` = pixels of unmatched predicted components / all pixels;
* grounding: precision and recall at IoU 0.5 with greedy one-to-one matching of boxes.
"""
from __future__ import annotations

import numpy as np

from ..data.templates import class_key

PD_DISTANCE_PX = 3.0


def class_in_text(text: str, classes: list[str]) -> str | None:
    """The class named in ``text`` (case, spaces, ``_`` and ``-`` ignored; the longest name
    found wins, so ``T72`` is not read as ``T7``); None if none is named."""
    key = class_key(text)
    found = [c for c in classes if class_key(c) and class_key(c) in key]
    return max(found, key=lambda c: len(class_key(c))) if found else None


def bleu4(hypotheses: list[str], references: list[list[str]]) -> float:
    """Corpus BLEU-4 in 0-1. ``references[i]`` are the references of ``hypotheses[i]``."""
    import sacrebleu

    if not hypotheses:
        return float("nan")
    n = max(len(r) for r in references)
    streams = [[r[k] if k < len(r) else r[0] for r in references] for k in range(n)]
    return sacrebleu.corpus_bleu(hypotheses, streams, lowercase=True).score / 100.0


def mask_iou(pred: np.ndarray, true: np.ndarray) -> tuple[int, int, float]:
    """``(intersection, union, IoU)`` of two ``(H, W)`` bool masks; IoU 1 when both are empty."""
    inter = int(np.logical_and(pred, true).sum())
    union = int(np.logical_or(pred, true).sum())
    return inter, union, (inter / union if union else 1.0)


def components(mask: np.ndarray, min_area: int = 1) -> list[np.ndarray]:
    """Connected components (8-connected) of an ``(H, W)`` bool mask with at least ``min_area`` pixels."""
    import cv2

    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    return [labels == i for i in range(1, n) if stats[i, cv2.CC_STAT_AREA] >= min_area]


def _centroid(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return np.array([xs.mean(), ys.mean()])


def target_detection(pred: np.ndarray, targets: list[np.ndarray]) -> tuple[int, int, int]:
    """SIRST-style detection: ``(detected targets, targets, false-alarm pixels)``."""
    comps = components(pred)
    centres = [_centroid(c) for c in comps]
    used = np.zeros(len(comps), dtype=bool)
    detected = 0
    for t in targets:
        ct = _centroid(t)
        for j, cp in enumerate(centres):
            if not used[j] and np.linalg.norm(cp - ct) < PD_DISTANCE_PX:
                used[j] = True
                detected += 1
                break
    false_pixels = int(sum(comps[j].sum() for j in np.flatnonzero(~used)))
    return detected, len(targets), false_pixels


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix of XYXY boxes ``(N, 4)`` x ``(M, 4)``."""
    a, b = np.asarray(a, dtype=float).reshape(-1, 4), np.asarray(b, dtype=float).reshape(-1, 4)
    x0 = np.maximum(a[:, None, 0], b[None, :, 0])
    y0 = np.maximum(a[:, None, 1], b[None, :, 1])
    x1 = np.minimum(a[:, None, 2], b[None, :, 2])
    y1 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = lambda z: (z[:, 2] - z[:, 0]) * (z[:, 3] - z[:, 1])  # noqa: E731
    union = area(a)[:, None] + area(b)[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def match_boxes(pred: np.ndarray, true: np.ndarray, threshold: float = 0.5) -> int:
    """True positives of a greedy one-to-one matching (highest IoU first) at ``threshold``."""
    iou = box_iou(pred, true)
    tp = 0
    while iou.size and iou.max() >= threshold:
        i, j = np.unravel_index(np.argmax(iou), iou.shape)
        tp += 1
        iou[i, :] = -1
        iou[:, j] = -1
    return tp
