"""Timing for the benchmark: ``timed`` (milliseconds per call after a warm-up), ``Row``
(one stage of one backend and precision, its samples, median and p95) and ``cpu_facts``
(the processor and the instruction sets integer GEMMs depend on, recorded with every run)."""
from __future__ import annotations

import platform
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


ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16")


def cpu_facts() -> dict:
    """``{"cpu_model", "isa"}``: the processor's name and which of ``ISA_FLAGS`` it has (Linux
    ``/proc/cpuinfo``; elsewhere the platform's name and an empty list). INT8 speed-ups depend on
    them: ONNX Runtime's U8S8 kernels use VNNI (or AMX) where present, slower AVX2 sequences
    otherwise, so ratios measured on one machine hold only on machines with the same flags."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    return {"cpu_model": model, "isa": [f for f in ISA_FLAGS if f in flags]}


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
