"""Which integer GEMM does ONNX Runtime run for the LLM's linear layers, and how fast is it?

``python benchmarks/int8_gemm.py --json out.json``

One ``MatMul`` with a constant weight, ``(M, K) x (K, N)``, at the shapes of SmolLM2-135M's
linear layers (hidden 576, MLP 1536) for a prefill of ``M`` tokens (``--tokens``, default 1,
64 and 330: one decode step, a short prompt, the edge preset's image prefix), in four forms:

* ``fp32``: the FP32 ``MatMul`` the FP32 build runs;
* ``nbits_fp32``: ``MatMulNBits``, 8-bit weight blocks of 128, ``accuracy_level`` 0: the
  weights are dequantized per block and the product is a float GEMM;
* ``nbits_int8``: the same file with ``accuracy_level`` 4, which is what the build writes
  (``export.quantize.quantize_weight_only``): the activations are quantized to int8 per row
  and block on the fly and the products are integer dot products (VNNI where the CPU has it);
* ``dynamic``: ``onnxruntime.quantization.quantize_dynamic`` (per-channel int8 weights,
  uint8 activations quantized per tensor at run time, ``MatMulInteger``, U8S8; on x86 CPUs
  without VNNI the runner makes the weights uint8, U8U8, since U8S8 saturates there).

Each file is opened as the project's CPU runner opens it (``OnnxRuntimeRunner``).

For each: median milliseconds, GFLOP/s, speed against ``fp32`` and the relative error of the
output against ``fp64`` (``max |y - y64| / max |y64|`` on random inputs shaped like a
transformer's: unit normal activations, weights of std 0.02). Prints a table, writes JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.timing import timed  # noqa: E402
from runners.cpu import cpu_facts  # noqa: E402

SHAPES = {"attention q/o (576 -> 576)": (576, 576), "MLP up (576 -> 1536)": (576, 1536),
          "MLP down (1536 -> 576)": (1536, 576)}
FORMS = ("fp32", "nbits_fp32", "nbits_int8", "dynamic")


def matmul_model(path: Path, w: np.ndarray) -> None:
    """An ONNX file of ``y = x @ w`` with ``x`` ``(M, K)`` float32, ``M`` dynamic."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    k, n = w.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="linear")], "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", n])],
        [numpy_helper.from_array(w.astype(np.float32), "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def with_accuracy_level(src: Path, dst: Path, level: int) -> None:
    """``src``'s ``MatMulNBits`` nodes with ``accuracy_level`` set to ``level``."""
    import onnx
    from onnx import helper

    model = onnx.load(str(src))
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            kept = [a for a in node.attribute if a.name != "accuracy_level"]
            del node.attribute[:]
            node.attribute.extend(kept + [helper.make_attribute("accuracy_level", level)])
    onnx.save(model, str(dst))


def build_forms(folder: Path, w: np.ndarray) -> dict[str, Path]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from export.quantize import quantize_weight_only

    fp32 = folder / "fp32.onnx"
    matmul_model(fp32, w)
    nbits = folder / "nbits_int8.onnx"
    quantize_weight_only(fp32, nbits)
    with_accuracy_level(nbits, folder / "nbits_fp32.onnx", 0)
    quantize_dynamic(str(fp32), str(folder / "dynamic.onnx"), weight_type=QuantType.QInt8, per_channel=True)
    return {f: folder / f"{f}.onnx" for f in FORMS}


def ops_of(path: Path) -> str:
    import onnx

    return ", ".join(sorted({n.op_type for n in onnx.load(str(path)).graph.node}))


def measure(tokens: list[int], threads: int, repeats: int, seed: int) -> list[dict]:
    from runners.onnxruntime_runner import OnnxRuntimeRunner

    rng = np.random.default_rng(seed)
    rows = []
    for name, (k, n) in SHAPES.items():
        w = rng.normal(0, 0.02, (k, n))
        with tempfile.TemporaryDirectory() as tmp:
            files = build_forms(Path(tmp), w)
            sessions = {}
            for f, p in files.items():  # as the project opens them (runners.qdq_cpu.prepare_for_cpu)
                runner = OnnxRuntimeRunner(f, p, device="cpu", threads=threads)
                runner.activate()
                sessions[f] = runner.session
            ops = {f: ops_of(p) for f, p in files.items()}
        for m in tokens:
            x = rng.normal(0, 1, (m, k))
            y64 = x @ w
            feed = {"x": x.astype(np.float32)}
            base = None
            for f in FORMS:
                s = sessions[f]
                y = s.run(None, feed)[0]
                ms = float(np.median(timed(lambda: s.run(None, feed), repeats, warmup=3)))
                base = base or ms
                rows.append({"layer": name, "tokens": m, "form": f, "ops": ops[f], "median_ms": round(ms, 4),
                             "gflops": round(2 * m * k * n / ms / 1e6, 2), "speedup_vs_fp32": round(base / ms, 3),
                             "rel_error": float(np.abs(y - y64).max() / np.abs(y64).max())})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 64, 330])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    import onnxruntime as ort

    rows = measure(args.tokens, args.threads, args.repeats, args.seed)
    cpu = cpu_facts()
    print(f"\n{cpu['cpu_model']} ({', '.join(cpu['isa']) or 'no AVX2'}); onnxruntime {ort.__version__}, "
          f"{args.threads} thread(s), median of {args.repeats}")
    print(f"{'layer':<28} {'M':>4} {'form':<11} {'ms':>8} {'GFLOP/s':>8} {'vs fp32':>8} {'rel err':>9}  ops")
    for r in rows:
        print(f"{r['layer']:<28} {r['tokens']:>4} {r['form']:<11} {r['median_ms']:>8.3f} {r['gflops']:>8.1f} "
              f"{r['speedup_vs_fp32']:>7.2f}x {r['rel_error']:>9.2e}  {r['ops']}")
    if args.json:
        args.json.write_text(json.dumps({**cpu, "onnxruntime": ort.__version__, "threads": args.threads,
                                         "repeats": args.repeats, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
