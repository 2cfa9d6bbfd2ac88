"""The inputs every part really sees: the PyTorch reference runs the calibration requests
and each part's feeds are recorded; downstream parts are calibrated on what the upstream
parts produce. Saved as feed-dict ``.npz`` files (``<part>.npz``, keys ``<i>/<input>``)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from earthgptx.config import PART_NAMES
from earthgptx.errors import InputError
from earthgptx.generation import GenerationConfig

from .dataset import Item, requests


def record_feeds(predictor, items: list[Item], requests_per_modality: int = 12,
                 max_new_tokens: int = 4, skipped: list | None = None) -> dict[str, dict[str, list[dict]]]:
    """``{part: {modality: [feed, ...]}}`` from running ``predictor`` (the PyTorch reference)."""
    from runners.recording import RecordingRunner

    feeds: dict[str, dict[str, list[dict]]] = {p: {} for p in PART_NAMES}
    original = predictor.runners
    try:
        for modality in sorted({i.modality for i in items}):
            pool = [i for i in items if i.modality == modality]
            recorders = {n: RecordingRunner(r, 10_000) for n, r in original.items()}
            predictor.runners = recorders
            done = 0
            for k in range(requests_per_modality):
                item = pool[k % len(pool)]
                text, prompts, task = requests(item, k // len(pool) + 1)[-1]
                try:
                    predictor.predict(item.image(), modality, text, prompts, task=task,
                                      generation=GenerationConfig(max_new_tokens=max_new_tokens))
                    done += 1
                except InputError as exc:
                    if skipped is not None:
                        skipped.append((item.key, str(exc)))
            for part, rec in recorders.items():
                feeds[part][modality] = rec.recording.feeds
            predictor.clear_cache()
    finally:
        predictor.runners = original
    return feeds


def balanced(per_modality: dict[str, list[dict]]) -> list[dict]:
    """One list with every modality equally represented (smaller ones repeated), so that
    histogram calibration (entropy, percentile) is not dominated by one sensor. Modalities
    take turns (``[optical 0, sar 0, infrared 0, optical 1, ...]``), so that every chunk the
    calibrator is fed (``export.quantize.CHUNK``) spans the sensors' ranges from the start."""
    groups = [g for g in per_modality.values() if g]
    if not groups:
        return []
    n = max(len(g) for g in groups)
    return [g[i % len(g)] for i in range(n) for g in groups]


def save_feeds(folder: Path, feeds: dict[str, dict[str, list[dict]]]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for part, per_mod in feeds.items():
        arrays = {}
        i = 0
        for modality, items in per_mod.items():
            for feed in items:
                for name, value in feed.items():
                    arrays[f"{i}/{name}"] = value
                arrays[f"{i}/__modality__"] = np.array(modality)
                i += 1
        path = folder / f"{part}.npz"
        np.savez_compressed(path, **arrays)
        paths.append(path)
    return paths
