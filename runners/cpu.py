"""What the CPU can do for integer GEMMs: ``cpu_facts`` (its name and the instruction sets
that matter) and ``u8s8_saturates`` (whether ONNX Runtime's uint8 x int8 kernels may saturate).

ONNX Runtime's x86 kernels multiply uint8 activations by int8 weights. With VNNI
(``avx512_vnni``, ``avx_vnni``) or AMX that is one exact instruction. Without them (AVX2 or
AVX-512 alone) they use ``vpmaddubsw``, which adds two u8 x s8 products into an int16 with
saturation: large activations times large weights clip, and results drift (measured here on
an AVX2-only CPU: the tiny vision encoder's INT8 output at cosine 0.988 to FP32 against 0.998
for the same integers computed exactly). ONNX Runtime's quantization guide gives the remedies:
7-bit ranges (``reduce_range``) or uint8 weights (u8 x u8 kernels do not saturate);
``qdq_cpu.to_unsigned_weights`` applies the second, losslessly, where this says so."""
from __future__ import annotations

import functools
import platform

ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16")
EXACT_U8S8 = ("avx512_vnni", "avx_vnni", "amx_int8")


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> tuple[str, frozenset]:
    model, flags = platform.processor() or platform.machine(), frozenset()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = frozenset(value.split())
                    break
    except OSError:
        pass
    return model, flags


def cpu_facts() -> dict:
    """``{"cpu_model", "isa"}``: the processor's name and which of ``ISA_FLAGS`` it has (Linux
    ``/proc/cpuinfo``; elsewhere the platform's name and an empty list). INT8 speed and, without
    VNNI, INT8 accuracy depend on them: ratios measured on one machine hold on machines with the
    same flags."""
    model, flags = _cpuinfo()
    return {"cpu_model": model, "isa": [f for f in ISA_FLAGS if f in flags]}


def u8s8_saturates() -> bool:
    """True on an x86 CPU without VNNI or AMX (where ONNX Runtime's u8 x s8 kernels may
    saturate; see the module's note). False elsewhere (ARM's dot-product kernels and
    non-Linux platforms, where the flags cannot be read, are taken as exact)."""
    _, flags = _cpuinfo()
    return bool(flags) and platform.machine().lower() in ("x86_64", "amd64") and not flags & set(EXACT_U8S8)
