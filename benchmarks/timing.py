"""Timing for the benchmark: ``timed`` (milliseconds per call after a warm-up) and
``Row`` (one stage of one backend and precision, its samples, median and p95)."""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np


def timed(fn, repeats: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1e3)
    return out


@dataclass
class Row:
    stage: str
    backend: str
    precision: str
    samples: list[float]
    extra: dict | None = None  # more fields of the row (a throughput row's requests_per_s, its configuration)

    def to_json(self) -> dict:
        return {"stage": self.stage, "backend": self.backend, "precision": self.precision,
                "median_ms": round(float(np.median(self.samples)), 3),
                "p95_ms": round(float(np.percentile(self.samples, 95)), 3), "n": len(self.samples),
                **(self.extra or {})}
