"""Choosing the calibration and evaluation sets of a folder without reading it all.

1. ``list_candidates`` names every image (file names only).
2. Per modality, quotas by number: ``calibration`` images (modest: they cost calibration
   time and memory) and ``evaluation`` images (at least 30 by default, so that a mean,
   a worst case and a 5th percentile mean something), each spread evenly over the datasets
   found (water-filling: every dataset gets a turn until its images or the quota run out).
3. Per dataset, a seeded permutation of its names is read in order, one image at a time,
   only as far as the quotas need. Evaluation images are picked from a small look-ahead
   buffer (``LOOKAHEAD`` read images per dataset) so that object sizes are spread as well:
   each pick takes a buffered image with objects before one without, and among those the
   one whose rarest size bucket is least represented so far.
   Unusable images are reported and replaced by the next name; a dataset that runs dry
   leaves its share to the others.

So reads are bounded by the quotas plus the look-ahead and the unusable images, whatever
the folder holds. Calibration and evaluation never share an image; a modality with a single
image is split into halves that share no pixel."""
from __future__ import annotations

import zlib
from collections import Counter

import numpy as np

from .dataset import NO_OBJECT, CalibrationError, CalibrationSet, Item, halves
from .listing import Candidate, list_candidates, load

EVALUATION_PER_MODALITY = 30
CALIBRATION_PER_MODALITY = 8
LOOKAHEAD = 6


def water_fill(sizes: dict[str, int], total: int) -> dict[str, int]:
    """``total`` spread over the keys of ``sizes`` one at a time in turn (sorted keys), none
    above its size: ``{"a": 1, "b": 50, "c": 50}``, 9 -> ``{"a": 1, "b": 4, "c": 4}``."""
    quota = dict.fromkeys(sizes, 0)
    left = min(total, sum(sizes.values()))
    while left > 0:
        for k in sorted(sizes):
            if left and quota[k] < sizes[k]:
                quota[k] += 1
                left -= 1
    return quota


class _Stream:
    """One dataset's candidates in a seeded order, read one at a time."""

    def __init__(self, candidates: list[Candidate], seed: int, skipped: list) -> None:
        # one generator per dataset: adding or removing another dataset leaves this order as it is
        key = zlib.crc32(f"{candidates[0].modality}/{candidates[0].dataset}".encode())
        rng = np.random.default_rng([seed, key])
        self.queue = [candidates[i] for i in rng.permutation(len(candidates))]
        self.skipped, self.buffer = skipped, []

    def fill(self, n: int) -> None:
        """Read until ``n`` usable items are buffered or the names run out."""
        while len(self.buffer) < n and self.queue:
            if (item := load(self.queue.pop(0), self.skipped)) is not None:
                self.buffer.append(item)

    def take(self, seen: Counter | None = None) -> Item | None:
        """The next item; with ``seen`` (size-bucket counts so far), the buffered one whose
        rarest bucket is least represented."""
        self.fill(LOOKAHEAD if seen is not None else 1)
        if not self.buffer:
            return None
        pick = 0
        if seen is not None:
            pick = min(range(len(self.buffer)), key=lambda i: _rarity(self.buffer[i], seen))
        return self.buffer.pop(pick)


def _rarity(item: Item, seen: Counter) -> tuple[bool, int]:
    """Sort key: images with objects first (masks of real objects are what INT8 can break;
    an image without objects is prompted at its centre), then the least represented bucket."""
    buckets = item.size_buckets()
    return NO_OBJECT in buckets, min(seen[b] for b in buckets)


def _draw(streams: dict[str, _Stream], quota: dict[str, int], stratify: bool) -> list[Item]:
    """Each dataset's quota, datasets taking turns (so that size buckets are balanced across
    them), then a top-up in turns from the datasets that still have images where one ran dry."""
    out, seen = [], Counter()
    want = sum(quota.values())
    left = dict(quota)
    active = sorted(streams)
    while len(out) < want and active:
        topping_up = not any(left[n] > 0 for n in active)
        for name in list(active):
            if len(out) >= want or (not topping_up and left[name] <= 0):
                continue
            if (item := streams[name].take(seen if stratify else None)) is None:
                active.remove(name)
                continue
            left[name] -= 1
            out.append(item)
            seen.update(item.size_buckets())
    return out


def choose(root, modality: str | None = None, evaluation: int = EVALUATION_PER_MODALITY,
           calibration: int = CALIBRATION_PER_MODALITY, seed: int = 0,
           exclude: frozenset[str] = frozenset()) -> CalibrationSet:
    """The calibration set of folder ``root`` (module docstring). Per modality: ``calibration``
    images (fewer where the modality has fewer than ``4 * calibration``: a quarter of them,
    at least one) and up to ``evaluation`` others. ``exclude``: image paths never to choose
    (e.g. the sets of an earlier build, to measure it on images it never saw)."""
    if evaluation < 1 or calibration < 1:
        raise CalibrationError(f"need at least one evaluation and one calibration image per modality, "
                               f"got {evaluation} and {calibration}")
    candidates, skipped = list_candidates(root, modality)
    candidates = [c for c in candidates if str(c.stub.image) not in exclude]
    cal, ev = [], []
    available: dict[str, dict[str, int]] = {}
    for m in sorted({c.modality for c in candidates}):
        by_dataset: dict[str, list[Candidate]] = {}
        for c in candidates:
            if c.modality == m:
                by_dataset.setdefault(c.dataset, []).append(c)
        sizes = {d: len(v) for d, v in by_dataset.items()}
        available[m] = sizes
        total = sum(sizes.values())
        streams = {d: _Stream(v, seed, skipped) for d, v in sorted(by_dataset.items())}
        if total == 1:  # one image: its halves, one to each set
            if (item := streams[next(iter(streams))].take()) is not None:
                left, right = halves(item)
                cal.append(left)
                ev.append(right)
            continue
        n_cal = min(calibration, max(1, total // 4))
        n_ev = min(evaluation, total - n_cal)
        ev_quota = water_fill(sizes, n_ev)
        cal_quota = water_fill({d: sizes[d] - ev_quota[d] for d in sizes}, n_cal)
        got_cal = _draw(streams, cal_quota, stratify=False)
        got_ev = _draw(streams, ev_quota, stratify=True)
        if len(got_cal) + len(got_ev) == 1:  # unusable images left one: its halves
            got_cal, got_ev = halves((got_cal + got_ev)[0])[:1], halves((got_cal + got_ev)[0])[1:]
        elif not got_cal and got_ev:
            got_cal = [got_ev.pop()]
        elif got_cal and not got_ev:
            got_ev = [got_cal.pop()]
        cal += got_cal
        ev += got_ev
    if not cal or not ev:
        raise CalibrationError(f"no usable calibration image under {root} ({len(candidates)} listed, {len(skipped)} "
                               "skipped); at least 2 images of a modality are needed (or one that can be split in halves)")
    return CalibrationSet(cal, ev, skipped, seed, evaluation, available)
