"""INT8 in the build: calibration set -> feeds -> Q/DQ (or weight-only) ONNX -> one decision
per part -> accuracy report on held-out images.

One decision per part, made here, before any engine is built: a part stays INT8 only if
1. its INT8 ONNX agrees with its PyTorch part on the recorded parity inputs (``parity.compare``
   with the spec's INT8 comparisons: the very check the build runs on every engine later), and
2. the pipeline with it in INT8 still gives the FP32 pipeline's answers on the evaluation
   images (``gate.Gate``): all parity-clean parts together first; if that fails, each alone
   (a part failing alone falls back), then, while the rest together still fail, the last in
   chain order.
A part with a second INT8 form (the LLM: ``quantize.LLM_FORMS``, the faster ``dynamic`` first)
that falls back in its first gets one more trial in its second, beside the parts kept.
A part failing either falls back to FP32 on its own, with the reason in the manifest's
``accuracy.decisions``; the build goes on. Never a silent accuracy loss."""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from earthgptx.errors import EarthGPTXError

from .accuracy import Evaluation, engine_metrics
from .gate import Gate, print_report, summarize_outcomes
from .quantize import LLM_FORMS, quantize_llm, quantize_qdq
from .specs import SPECS


def _predictor(reference, paths: dict[str, Path], device: str):
    from earthgptx.predictor import Predictor
    from runners.onnxruntime_runner import OnnxRuntimeRunner

    runners = {part: OnnxRuntimeRunner(part, path, device=device) for part, path in paths.items()}
    return Predictor(runners, reference.tokenizer, reference.config, reference.embed_table)


def _form_path(out: Path, part: str, form: str) -> Path:
    """Where ``part``'s INT8 file in ``form`` is written: a folder of its own, so that the kept
    one moves to ``<part>.int8.onnx`` with its external data file (whose name the model holds)."""
    return out / "int8-forms" / form / f"{part}.int8.onnx"


def _quantize(opts, reference, onnx_paths, parts, feeds, console) -> tuple[dict[str, Path], dict, dict]:
    """INT8 files of ``parts``; returns ``(paths, info, second forms {part: (path, info)})``."""
    from calibration.feeds import balanced

    out, sources, info, second = opts.out_dir, {}, {}, {}
    for part in parts:
        dst = out / f"{part}.int8.onnx"
        with console.status(f"{part}: INT8 quantization"):
            if part == "llm":
                paths = {}
                for form in LLM_FORMS:
                    paths[form] = _form_path(out, part, form)
                    paths[form].parent.mkdir(parents=True, exist_ok=True)
                    q = quantize_llm(onnx_paths[part], paths[form], form)
                    if form == LLM_FORMS[0]:
                        dst, first = paths[form], q
                    else:
                        second[part] = (paths[form], q)
                q = first
            else:
                data = balanced(feeds[part])
                if not data:
                    raise EarthGPTXError(f"{part}: no calibration inputs were recorded")
                q = quantize_qdq(onnx_paths[part], dst, data, opts.calibration_method,
                                 SPECS[part](reference.config).int8_keep_fp32)
        sources[part], info[part] = dst, {"quantization": q}
    return sources, info, second


def _settle(out: Path, part: str, chosen: Path) -> Path:
    """Move the kept INT8 file of ``part`` (and its data file) to ``out/<part>.int8.onnx`` and
    remove the other forms; returns the new path."""
    dst = out / f"{part}.int8.onnx"
    if chosen != dst:
        for suffix in ("", ".data"):
            src = chosen.with_name(chosen.name + suffix)
            if src.exists():
                shutil.move(str(src), str(dst.with_name(dst.name + suffix)))
    shutil.rmtree(out / "int8-forms", ignore_errors=True)
    return dst


def parity_of(part: str, path: Path, recording, spec, device: str):
    """``parity.compare`` of the INT8 file of ``part`` against its PyTorch recording."""
    from runners.onnxruntime_runner import OnnxRuntimeRunner

    from .parity import compare

    with OnnxRuntimeRunner(part, path, device=device) as runner:
        return compare(part, runner, recording, spec, "int8")


def decide(parts: list[str], parity_failures: dict[str, str], evaluate, gate: Gate,
           second_forms: dict | None = None) -> tuple[dict[str, str], dict]:
    """Which parts fall back, and why (``{part: reason}``), and the report of what is kept.
    ``evaluate(int8_parts)`` -> report (``gate.summarize_outcomes``) of the pipeline with those
    parts in INT8 and the others in FP32. ``second_forms``: ``{part: switch}`` for parts with a
    second INT8 form; ``switch()`` makes ``evaluate`` use it and returns its parity failure
    (None when it passes). A part that fell back is tried once in it, with the parts kept."""
    fallback, report = _first_decision(parts, parity_failures, evaluate, gate)
    for part, switch in (second_forms or {}).items():
        if part not in fallback:
            continue
        first, why = fallback[part], switch()
        if why is not None:
            fallback[part] = f"{first}; second form, parity: {why}"
            continue
        kept = [p for p in parts if p not in fallback]
        trial = evaluate(kept + [part])
        failures = gate.failures(trial)
        if failures:
            fallback[part] = f"{first}; second form, gate: " + "; ".join(failures[:4])
        else:
            del fallback[part]
            report = trial
    return fallback, report


def _first_decision(parts: list[str], parity_failures: dict[str, str], evaluate, gate: Gate):
    fallback = {p: f"parity: {why}" for p, why in parity_failures.items()}
    remaining = [p for p in parts if p not in fallback]
    report = evaluate(remaining)
    failures = gate.failures(report)
    if failures and remaining:
        combined = "; ".join(failures[:4]) + (f"; and {len(failures) - 4} more" if len(failures) > 4 else "")
        for part in list(remaining):
            alone = failures if len(remaining) == 1 else gate.failures(evaluate([part]))
            if alone:
                fallback[part] = "gate, alone in INT8: " + "; ".join(alone[:4])
        remaining = [p for p in remaining if p not in fallback]
        report = evaluate(remaining)
        while remaining and gate.failures(report):  # interactions: drop the last INT8 part in chain order
            dropped = remaining.pop()
            fallback[dropped] = f"gate, combined with the other INT8 parts: {combined}"
            report = evaluate(remaining)
    return fallback, report


def build_int8(opts, reference, onnx_paths: dict[str, Path], parts: list[str], recordings: dict, console):
    """Returns ``(sources, precisions, per-part info, accuracy report)``; ``recordings`` are the
    PyTorch parity recordings (``parity.record_chain``) the build checks every engine on."""
    from calibration.dataset import evaluation_requests
    from calibration.feeds import record_feeds, save_feeds
    from calibration.sampling import choose

    out = opts.out_dir
    gate = opts.gate or Gate()
    with console.status(f"listing and sampling calibration imagery in {opts.calibration}"):
        calset = choose(opts.calibration, opts.calibration_modality, evaluation=opts.evaluation_images,
                        calibration=opts.calibration_images, seed=0)
    summary = calset.summary()
    console.print(f"calibration: {summary['calibration_images']} images, evaluation: {summary['evaluation_images']}, "
                  f"{len(calset.skipped)} skipped")
    for note in summary["notes"].values():
        console.print(f"  [yellow]{note}[/]")
    for path, why in calset.skipped[:10]:
        console.print(f"  skipped {path}: {why}", highlight=False)
    with console.status("running the PyTorch reference on the calibration requests"):
        feeds = record_feeds(reference, calset.calibration, skipped=calset.skipped)
        save_feeds(out / "calibration", feeds)
    int8_paths, info, second = _quantize(opts, reference, onnx_paths, parts, feeds, console)

    def check_parity(part: str):
        with console.status(f"{part}: INT8 parity with PyTorch"):
            p = parity_of(part, int8_paths[part], recordings[part], SPECS[part](reference.config), opts.device)
        info[part]["int8_parity"] = p.to_json()
        if not p.passed:
            console.print(f"[yellow]{part}: INT8 ({info[part]['quantization'].get('form', 'Q/DQ')}) fails parity:[/] "
                          f"{p.reason()}", highlight=False)
        return None if p.passed else p.reason()

    parity_failures = {part: why for part in parts if (why := check_parity(part)) is not None}

    def second_form(part: str):
        def switch():
            path, q = second[part]
            console.print(f"{part}: trying its second INT8 form ({q['form']})", highlight=False)
            info[part]["first_form"] = {"quantization": info[part]["quantization"],
                                        "int8_parity": info[part]["int8_parity"]}
            int8_paths[part], info[part]["quantization"] = path, q
            return check_parity(part)
        return switch

    fp32 = _predictor(reference, onnx_paths, opts.device)
    step = max(1, len(calset.evaluation) // 3)

    def progress(what: str, done: int, total: int) -> None:  # a line now and then: builds run for long
        if done % step == 0 or done == total:
            console.print(f"  accuracy, {what}: {done}/{total} evaluation images", highlight=False)

    evaluation = Evaluation(fp32, calset.evaluation, evaluation_requests, progress=progress)
    reports: dict[tuple, dict] = {}

    def evaluate(int8_parts: list[str]) -> dict:
        key = tuple(sorted((p, str(int8_paths[p])) for p in int8_parts))  # a part's second form is another file
        if key not in reports:
            chosen = {**onnx_paths, **{p: int8_paths[p] for p in int8_parts}}
            with console.status(f"accuracy vs FP32 with {', '.join(sorted(int8_parts)) or 'no part'} in INT8"):
                reports[key] = summarize_outcomes(evaluation.compare(_predictor(reference, chosen, opts.device)))
        return reports[key]

    fallback, report = decide(parts, parity_failures, evaluate, gate, {p: second_form(p) for p in second})
    for part in second:  # the form kept (or the one last tried) becomes <part>.int8.onnx
        int8_paths[part] = _settle(out, part, int8_paths[part])
    sources, precisions = dict(onnx_paths), {p: "fp32" for p in onnx_paths}
    kept = [p for p in parts if p not in fallback]
    for part in kept:
        sources[part], precisions[part] = int8_paths[part], "int8"
    for part, why in fallback.items():
        console.print(f"[yellow]{part} falls back to FP32:[/] {why}", highlight=False)
        info[part]["fallback"] = {"to": "fp32", "reason": why}

    # per-engine agreement on the evaluation images' real inputs (kept and fallen-back parts alike)
    eval_feeds = record_feeds(fp32, calset.evaluation, requests_per_modality=3)
    from runners.onnxruntime_runner import OnnxRuntimeRunner

    for part in parts:
        feeds_part = [f for group in eval_feeds[part].values() for f in group]
        with OnnxRuntimeRunner(part, onnx_paths[part], device=opts.device) as ref, \
                OnnxRuntimeRunner(part, int8_paths[part], device=opts.device) as q8:
            info[part]["int8_vs_fp32"] = engine_metrics(ref, q8, feeds_part)
    decisions = {p: {"precision": precisions[p], "int8_parity": info[p]["int8_parity"]["passed"],
                     "reason": fallback.get(p, "INT8 passed parity and the gate")} for p in parts}
    accuracy = {"gate": dataclasses.asdict(gate), "per_modality": report, "passed": not gate.failures(report),
                "int8_parts": kept, "fallback": fallback, "decisions": decisions,
                "all_int8": next(iter(reports.values()), None),  # decide's first trial: every parity-clean part
                "calibration": summary, "skipped": [{"path": p, "reason": r} for p, r in calset.skipped]}
    print_report(report, console, f"INT8 ({', '.join(kept) or 'no part'}) vs FP32 on held-out images")
    for part in parts:
        m = info[part]["int8_vs_fp32"]
        console.print(f"{part}: INT8 vs FP32 engine cosine {m['cosine']:.5f}, max error {m['max_abs']:.3e}"
                      + (f"  -> kept FP32 ({fallback[part]})" if part in fallback else "  -> INT8"), highlight=False)
    return sources, precisions, info, accuracy
