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
    flat = mask.ravel(order="F")
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    runs = np.diff(np.concatenate([[0], change, [flat.size]]))
    if flat.size and flat[0]:
        runs = np.concatenate([[0], runs])
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


def _compress(runs) -> str:
    """pycocotools' string form, vectorised: each run (from the 4th on, minus the run two
    before) is written in 5-bit chunks, low first, 0x20 marking "more", as ``chr(c + 48)``;
    a chunk ends the value when the rest is its sign extension."""
    x = np.asarray(runs, dtype=np.int64)
    if x.size == 0:
        return ""
    v = x.copy()
    v[3:] -= x[1:-2]
    bits = int(np.abs(v).max()).bit_length() + 1  # with the sign
    chunks, emitted = [], []
    live = np.ones(v.size, dtype=bool)  # this value still has chunks to write
    for _ in range(-(-bits // 5)):
        c = v & 0x1F
        v = v >> 5  # arithmetic: negatives stay negative
        more = np.where(c & 0x10, v != -1, v != 0)
        chunks.append(c | (more.astype(np.int64) << 5))
        emitted.append(live)
        live = live & more
    chunks_t, emitted_t = np.stack(chunks, axis=1), np.stack(emitted, axis=1)  # (runs, chunks)
    return (chunks_t[emitted_t] + 48).astype(np.uint8).tobytes().decode("ascii")


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
