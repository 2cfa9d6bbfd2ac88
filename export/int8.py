"""INT8 in the build: calibration set -> feeds -> Q/DQ (or weight-only) ONNX -> accuracy
report on held-out images per modality -> gate with per-part fallback to FP32.

A part stays INT8 only if the whole pipeline still agrees with FP32 (``accuracy.Gate``);
otherwise it falls back and the build says which and why. Never a silent accuracy loss."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from earthgptx.errors import EarthGPTXError

from .accuracy import Gate, end_to_end, engine_metrics
from .quantize import quantize_qdq, quantize_weight_only
from .specs import SPECS


def _predictor(reference, paths: dict[str, Path], device: str):
    from earthgptx.predictor import Predictor
    from runtime.onnxruntime_runner import OnnxRuntimeRunner

    runners = {part: OnnxRuntimeRunner(part, path, device=device) for part, path in paths.items()}
    return Predictor(runners, reference.tokenizer, reference.config, reference.embed_table)


def build_int8(opts, reference, onnx_paths: dict[str, Path], parts: list[str], console):
    """Returns ``(sources, precisions, per-part quantization info, accuracy report)``."""
    from calibration.dataset import requests
    from calibration.sampling import choose
    from calibration.feeds import balanced, record_feeds, save_feeds

    out = opts.out_dir
    gate = opts.gate or Gate()
    with console.status(f"reading calibration imagery in {opts.calibration}"):
        calset = choose(opts.calibration, opts.calibration_modality, seed=0)
        skipped = calset.skipped
    summary = calset.summary()
    console.print(f"calibration: {summary['calibration_images']} images, evaluation: {summary['evaluation_images']}, "
                  f"{len(skipped)} skipped")
    for path, why in skipped[:10]:
        console.print(f"  skipped {path}: {why}", highlight=False)
    with console.status("running the PyTorch reference on the calibration requests"):
        feeds = record_feeds(reference, calset.calibration, skipped=calset.skipped)
        save_feeds(out / "calibration", feeds)

    sources, precisions, info = dict(onnx_paths), {p: "fp32" for p in onnx_paths}, {}
    for part in parts:
        dst = out / f"{part}.int8.onnx"
        with console.status(f"{part}: INT8 quantization"):
            if part == "llm":
                q = quantize_weight_only(onnx_paths[part], dst)
            else:
                data = balanced(feeds[part])
                if not data:
                    raise EarthGPTXError(f"{part}: no calibration inputs were recorded")
                q = quantize_qdq(onnx_paths[part], dst, data, opts.calibration_method,
                                 SPECS[part](reference.config).int8_keep_fp32)
        sources[part], precisions[part] = dst, "int8"
        info[part] = {"quantization": q}

    fp32 = _predictor(reference, onnx_paths, opts.device)

    def evaluate(chosen: dict[str, Path]):
        return end_to_end(fp32, _predictor(reference, chosen, opts.device), calset.evaluation, requests)

    with console.status("accuracy: INT8 pipeline vs FP32 on held-out images"):
        report = evaluate(sources)
    failures = gate.failures(report)
    fallback: dict[str, str] = {}
    if failures:
        console.print("accuracy gate failed with every INT8 part: " + "; ".join(failures))
        for part in parts:  # which parts break it on their own
            alone = {**onnx_paths, part: sources[part]}
            with console.status(f"accuracy: {part} alone in INT8"):
                f = gate.failures(evaluate(alone))
            if f:
                fallback[part] = "; ".join(f)
        remaining = [p for p in parts if p not in fallback]
        chosen = {**onnx_paths, **{p: sources[p] for p in remaining}}
        report = evaluate(chosen) if remaining else evaluate(onnx_paths)
        while remaining and gate.failures(report):  # interactions: drop the last INT8 part in chain order
            dropped = remaining.pop()
            fallback[dropped] = "the gate still failed with it combined with the other INT8 parts"
            chosen = {**onnx_paths, **{p: sources[p] for p in remaining}}
            report = evaluate(chosen)
    for part, why in fallback.items():
        console.print(f"[yellow]{part} falls back to FP32:[/] {why}")
        sources[part], precisions[part] = onnx_paths[part], "fp32"
        info[part]["fallback"] = {"to": "fp32", "reason": why}

    # per-engine agreement on the evaluation images' real inputs
    eval_feeds = record_feeds(fp32, calset.evaluation, requests_per_modality=3)
    for part in parts:
        from runtime.onnxruntime_runner import OnnxRuntimeRunner

        feeds_part = [f for group in eval_feeds[part].values() for f in group]
        with OnnxRuntimeRunner(part, onnx_paths[part], device=opts.device) as ref, \
                OnnxRuntimeRunner(part, out / f"{part}.int8.onnx", device=opts.device) as q8:
            info[part]["int8_vs_fp32"] = engine_metrics(ref, q8, feeds_part)
    accuracy = {"gate": dataclasses.asdict(gate), "per_modality": report,
                "passed": not gate.failures(report), "int8_parts": [p for p in parts if p not in fallback],
                "fallback": fallback, "calibration": summary,
                "skipped": [{"path": p, "reason": r} for p, r in calset.skipped]}
    print_accuracy(accuracy, info, console)
    return sources, precisions, info, accuracy


def print_accuracy(accuracy: dict, info: dict, console) -> None:
    from rich.table import Table

    t = Table(title="INT8 accuracy vs FP32 (held-out images)")
    for col in ("modality", "images", "mask IoU", "box IoU", "token agreement"):
        t.add_column(col, no_wrap=True)
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    for m, r in accuracy["per_modality"].items():
        t.add_row(m, str(r["images"]), fmt(r["mask_iou"]), fmt(r["box_iou"]),
                  f"{fmt(r['token_agreement'])} ({r['tokens_counted']} tokens)")
    console.print(t)
    for part, i in info.items():
        m = i.get("int8_vs_fp32", {})
        console.print(f"{part}: INT8 vs FP32 engine cosine {m.get('cosine', float('nan')):.5f}, "
                      f"max error {m.get('max_abs', float('nan')):.3e}"
                      + (f"  -> kept FP32 ({i['fallback']['reason']})" if "fallback" in i else ""), highlight=False)
