"""COCO run-length encoding of binary masks, compatible with pycocotools.

A mask ``(H, W)`` is read in column-major (Fortran) order; runs alternate
background/foreground starting with background. ``counts`` is the compressed
string form pycocotools writes (``mask.encode``) and reads (``mask.decode``).
"""
from __future__ import annotations

import numpy as np

from .errors import InputError


def mask_to_rle(mask: np.ndarray) -> dict:
    """``(H, W)`` bool -> ``{"size": [H, W], "counts": str}``."""
    mask = np.asarray(mask, dtype=bool)
    h, w = mask.shape
    flat = mask.ravel(order="F").astype(np.int8)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        runs = [0] + runs
    return {"size": [int(h), int(w)], "counts": _compress(runs)}


def rle_to_mask(rle: dict) -> np.ndarray:
    """Inverse of ``mask_to_rle`` (also takes ``counts`` as a list of ints)."""
    try:
        h, w = (int(v) for v in rle["size"])
        counts = rle["counts"]
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"not a COCO RLE object (need 'size': [H, W] and 'counts'): {exc}") from exc
    runs = _decompress(counts) if isinstance(counts, (str, bytes)) else [int(c) for c in counts]
    if sum(runs) != h * w:
        raise InputError(f"RLE counts cover {sum(runs)} pixels but size is {h}x{w}")
    values = np.zeros(len(runs), dtype=bool)
    values[1::2] = True
    flat = np.repeat(values, runs)
    return flat.reshape((w, h)).T


def _compress(runs: list[int]) -> str:
    out = []
    for i, x in enumerate(runs):
        if i > 2:
            x -= runs[i - 2]
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = (x != -1) if (c & 0x10) else (x != 0)
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return "".join(out)


def _decompress(s: str | bytes) -> list[int]:
    if isinstance(s, bytes):
        s = s.decode("ascii")
    runs: list[int] = []
    p = 0
    while p < len(s):
        x, k, more = 0, 0, True
        while more:
            if p >= len(s):
                raise InputError("truncated RLE counts string")
            c = ord(s[p]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(runs) > 2:
            x += runs[-2]
        runs.append(x)
    return runs
