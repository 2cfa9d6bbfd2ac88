"""Benchmark: every part, the end-to-end tasks, clicks on an encoded image and LLM decode,
for each backend side by side in one run on the same machine (PyTorch eager FP32 is the
reference). Prints a table of medians and ratios, and writes JSON with ``--json``.

Stages: the part names, ``end_to_end_grounding``, ``end_to_end_segmentation``,
``end_to_end_region`` (a new image each time), ``prefix_cached_segmentation`` (a new prompt
on an image whose embedding and prompt-prefix KV are cached), ``click_to_mask`` (a new point
in an already-encoded zoom window, up to its COCO RLE at the original size),
``click_to_mask_new_window`` (a point anywhere: on a zoomed image mostly a window that must be
encoded first) and
``decode_per_token``; through ``egx serve`` (backend ``zmq``, benchmarks/served.py):
``zmq_overhead``, ``click_to_mask``, ``click_to_mask_new_window``, ``end_to_end_segmentation``
and throughput rows.
Decode is also reported against this machine's memory bandwidth: the bytes a token must read
(weights + KV cache) / the measured copy bandwidth."""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from earthgptx.generation import GenerationConfig, generate
from earthgptx.processing import VisualPrompts
from runners.cpu import cpu_facts

from .served import points_anywhere, points_in_window
from .timing import Row, timed

SAR_IMAGE = "sar/hrsid/P0094_0_800_3000_3800.png"


def copy_bandwidth(mb: int = 256, repeats: int = 5) -> float:
    """Memory-copy bandwidth in GB/s (bytes read + written per second), median of ``repeats``."""
    src = np.ones(mb * (1 << 20) // 8, dtype=np.float64)
    dst = np.empty_like(src)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - t)
    return 2 * src.nbytes / float(np.median(times)) / 1e9


def bench_backend(predictor, backend: str, precision: str, image: np.ndarray, repeats: int) -> list[Row]:
    from runners.recording import RecordingRunner

    rows = []
    point = VisualPrompts([(400, 400)], [], [])
    gen = GenerationConfig(max_new_tokens=8)
    # one real request, recorded, gives each part a realistic feed
    original = predictor.runners
    predictor.runners = {n: RecordingRunner(r, 1) for n, r in original.items()}
    predictor.clear_cache()
    predictor.predict(image, "sar", "What is in <region1>?", VisualPrompts([], [(300, 300, 500, 450)], []),
                      generation=GenerationConfig(max_new_tokens=1))
    predictor.predict(image, "sar", "Segment the ship.", point, generation=GenerationConfig(max_new_tokens=0))
    feeds = {n: r.recording.feeds[0] for n, r in predictor.runners.items()}
    predictor.runners = original
    for part, feed in feeds.items():
        runner = predictor.runners[part]
        rows.append(Row(part, backend, precision, timed(lambda: runner(feed), repeats)))

    def end_to_end(text, prompts, task, keep: list | None = None):
        def run():
            predictor.clear_cache()
            start = time.perf_counter()
            r = predictor.predict(image, "sar", text, prompts, task=task, generation=gen)
            if keep is not None:
                keep.append({**r.timings_ms, "total": (time.perf_counter() - start) * 1e3})
        return run

    e2e_repeats = max(3, repeats // 2)
    rows.append(Row("end_to_end_grounding", backend, precision,
                    timed(end_to_end("Where is the ship?", None, "grounding"), e2e_repeats)))
    stages: list[dict] = []
    rows.append(Row("end_to_end_segmentation", backend, precision,
                    timed(end_to_end("Segment the ship.", point, "segment", stages), e2e_repeats),
                    {"where_ms": where_the_time_goes(stages[1:])}))  # [0]: the warm-up call
    rows.append(Row("end_to_end_region", backend, precision,
                    timed(end_to_end("What is in <region1>?", VisualPrompts([], [(300, 300, 500, 450)], []), "region"),
                          e2e_repeats)))
    # a new prompt on an image seen before: its embedding and prompt-prefix KV are cached
    # (asked with the same point, so that a zoomed request finds the same window's encoding)
    predictor.clear_cache()
    predictor.predict(image, "sar", "What is in <region1>?", point, task="region",
                      generation=GenerationConfig(max_new_tokens=1))
    rows.append(Row("prefix_cached_segmentation", backend, precision,
                    timed(lambda: predictor.predict(image, "sar", "Segment the ship.", point, task="segment",
                                                    generation=gen), e2e_repeats)))
    # a click answered as the user gets it: prompt, pixel decoder, the mask at the original size,
    # COCO RLE; new points in the zoom window already encoded, and points anywhere (on a zoomed
    # image mostly a window not encoded yet: its vision encoder call is in the time)
    size = predictor.config.vision.image_size
    near = iter(VisualPrompts([p], [], []) for p in points_in_window(repeats + 1, size, image.shape))
    rows.append(Row("click_to_mask", backend, precision,
                    timed(lambda: predictor.predict(image, "sar", "", next(near), task="click").to_json(), repeats)))
    far = iter(VisualPrompts([p], [], []) for p in points_anywhere(repeats + 1, image.shape, seed=1))
    rows.append(Row("click_to_mask_new_window", backend, precision,
                    timed(lambda: predictor.predict(image, "sar", "", next(far), task="click").to_json(), repeats)))
    llm_feed = feeds["llm"]
    g = generate(predictor.runners["llm"], llm_feed["inputs_embeds"], predictor.embed_table, predictor.config.llm,
                 GenerationConfig(max_new_tokens=max(16, repeats)), set(), -1, lambda ids: "")
    rows.append(Row("decode_per_token", backend, precision, g.decode_ms))
    return rows


STAGES = ("preprocess", "vision_encoder", "prompt_encoder", "llm_prefill", "llm_decode", "pixel_decoder",
          "postprocess")


def where_the_time_goes(calls: list[dict]) -> dict:
    """Median milliseconds of each stage of a request (``Prediction.timings_ms``) over
    ``calls``, and ``other``: the median of what the stages do not cover (tokenizing, prompt
    assembly, Python between the parts)."""
    out = {k: round(float(np.median([c.get(k, 0.0) for c in calls])), 2) for k in STAGES}
    out["other"] = round(float(np.median([c["total"] - sum(c.get(k, 0.0) for k in STAGES) for c in calls])), 2)
    return out


def decode_ceiling(predictor, bandwidth_gbs: float, decode_ms: float, context: int, weight_bytes: float = 4) -> dict:
    """Bytes a decode step must read (the LLM's weights, ``weight_bytes`` per linear weight,
    the LM head's included, FP32 norms, + its FP32 KV cache) vs the copy bandwidth."""
    c = predictor.config.llm
    vocab = predictor.embed_table.shape[0]
    per_layer = weight_bytes * (c.hidden * (c.hidden + 2 * c.kv_heads * c.head_dim) + c.hidden * c.hidden
                                + 3 * c.hidden * c.intermediate) + 4 * 2 * c.hidden
    weights = c.layers * per_layer + weight_bytes * vocab * c.hidden  # lm_head (INT8 builds quantize it too)
    kv = 4 * 2 * c.layers * c.kv_heads * c.head_dim * context
    ceiling_ms = (weights + kv) / (bandwidth_gbs * 1e9) * 1e3
    return {"bytes_per_token": int(weights + kv), "bandwidth_gbs": round(bandwidth_gbs, 2),
            "ceiling_ms": round(ceiling_ms, 3), "measured_ms": round(decode_ms, 3),
            "fraction_of_ceiling": round(ceiling_ms / decode_ms, 3)}


def precision_of(manifest: dict) -> tuple[str, dict[str, str]]:
    """The build's precision (``int8`` if any part is) and each part's."""
    parts = {p: e["precision"] for p, e in manifest["engines"].items()}
    return ("int8" if "int8" in parts.values() else sorted(set(parts.values()))[0]), parts


def run_bench(preset: str, engines: list[Path], data_root: Path, repeats: int = 10, zmq: bool = True,
              log=None) -> dict:
    import onnxruntime
    import torch

    from earthgptx.checkpoint import load_reference
    from earthgptx.imageio import read_image
    from earthgptx.predictor import Predictor
    from runners.engines import open_predictor
    from runners.manifest import load_manifest

    image = read_image(data_root / SAR_IMAGE).data
    model, tokenizer = load_reference(None if preset == "default" else preset, None)
    backends = [("pytorch", "fp32", Predictor.from_model(model, tokenizer))]
    part_precisions = {}
    for folder in engines:
        precision, parts = precision_of(load_manifest(folder))
        part_precisions[precision] = parts
        backends.append(("onnxruntime", precision, open_predictor(folder, device="cpu")))
    rows = []
    for backend, precision, predictor in backends:
        rows += bench_backend(predictor, backend, precision, image, repeats)
    served = {}
    if zmq and engines:  # the first build through egx serve, beside the same build in process
        from .served import bench_zmq

        _, precision, predictor = backends[1]
        zmq_rows, served = bench_zmq(engines[0], precision, image, repeats, predictor, log)
        rows += zmq_rows
    bandwidth = copy_bandwidth()
    ceilings = {}
    context = model.config.vision.num_tokens + 80
    for backend, precision, predictor in backends:
        dec = next(r for r in rows if r.stage == "decode_per_token" and r.backend == backend
                   and r.precision == precision)
        # int8 weights + one FP32 scale per block of 128 (per channel in the dynamic form: less)
        weight_bytes = 1 + 4 / 128 if part_precisions.get(precision, {}).get("llm") == "int8" else 4
        ceilings[f"{backend} {precision}"] = decode_ceiling(predictor, bandwidth, float(np.median(dec.samples)),
                                                            context, weight_bytes)
    machine = {"cpu": platform.processor() or platform.machine(), **cpu_facts(), "cores": os.cpu_count(),
               "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
               "onnxruntime": onnxruntime.__version__, "copy_bandwidth_gbs": round(bandwidth, 2)}
    return {"machine": machine, "preset": preset, "engines": [str(e) for e in engines],
            "part_precisions": part_precisions, "rows": [r.to_json() for r in rows], "decode_vs_bandwidth": ceilings,
            "served": served}


def print_report(report: dict, console) -> None:
    from rich.table import Table

    ref = {r["stage"]: r["median_ms"] for r in report["rows"] if r["backend"] == "pytorch"}
    m = report["machine"]
    isa = ", ".join(m.get("isa", [])) or "no AVX2"
    table = Table(title=f"egx bench: {report['preset']} ({m.get('cpu_model', m['cpu'])}, {isa}; {m['cores']} cores)")
    for col in ("stage", "backend", "precision", "median ms", "p95 ms", "speed-up vs PyTorch"):
        table.add_column(col, no_wrap=True)
    parts = report.get("part_precisions", {})
    for r in report["rows"]:
        ratio = f"{ref[r['stage']] / r['median_ms']:.2f}x" if r["stage"] in ref and r["median_ms"] else "-"
        own = parts.get(r["precision"], {}).get(r["stage"]) if r["backend"] == "onnxruntime" else None
        precision = r["precision"] if own in (None, r["precision"]) else f"{r['precision']} build, {own} part"
        table.add_row(r["stage"], r["backend"], precision, f"{r['median_ms']:.1f}", f"{r['p95_ms']:.1f}", ratio)
    console.print(table)
    where = [r for r in report["rows"] if r["stage"] == "end_to_end_segmentation" and r.get("where_ms")]
    if where:
        t = Table(title="end_to_end_segmentation: where the time goes (median ms per stage)")
        t.add_column("stage", no_wrap=True)
        for r in where:
            t.add_column(f"{r['backend']} {r['precision']}", justify="right")
        for stage in (*STAGES, "other"):
            t.add_row(stage, *(f"{r['where_ms'][stage]:.1f}" for r in where))
        console.print(t)
    for precision, parts in report["part_precisions"].items():
        console.print(f"onnxruntime {precision}: " + ", ".join(f"{p} {v}" for p, v in parts.items()))
    print_served(report, console)
    for r in report["rows"]:
        if r["stage"].startswith("scene_"):
            workers = f", workers {r['worker_peak_rss_mb']} MB" if r.get("worker_peak_rss_mb") else ""
            console.print(f"{r['stage']} {r['backend']} {r['precision']}: {r['tiles_per_s']:.2f} tiles/s, peak RSS "
                          f"{r['peak_rss_mb']:.0f} MB{workers} (the scene read whole: {r['scene_raw_mb']:.0f} MB)")
    for backend, d in report["decode_vs_bandwidth"].items():  # backend and precision
        console.print(f"decode {backend}: {d['measured_ms']:.1f} ms/token; reading {d['bytes_per_token'] / 1e6:.0f} MB "
                      f"at {d['bandwidth_gbs']:.1f} GB/s takes {d['ceiling_ms']:.1f} ms: "
                      f"{100 * d['fraction_of_ceiling']:.0f}% of the bandwidth ceiling")


def print_served(report: dict, console) -> None:
    """The ZeroMQ path against the same build in process."""
    zmq = {r["stage"]: r for r in report["rows"] if r["backend"] == "zmq"}
    if "zmq_overhead" not in zmq:
        return
    precision = zmq["zmq_overhead"]["precision"]
    local = {r["stage"]: r["median_ms"] for r in report["rows"]
             if r["backend"] == "onnxruntime" and r["precision"] == precision}
    overhead, e2e = zmq["zmq_overhead"]["median_ms"], zmq["end_to_end_segmentation"]["median_ms"]
    console.print(f"zmq: overhead {overhead:.2f} ms per request with a 448 px image = {100 * overhead / e2e:.1f}% of "
                  f"end-to-end segmentation ({e2e:.1f} ms); served / in process ({precision}): click_to_mask "
                  f"{zmq['click_to_mask']['median_ms'] / local['click_to_mask']:.2f}x, end_to_end_segmentation "
                  f"{e2e / local['end_to_end_segmentation']:.2f}x")
    for name, t in report["served"].items():
        what = "a new image each" if t.get("new_image_per_request") else "one cached image"
        console.print(f"throughput {name.replace('_', ' ')}: {t['requests_per_s']:.2f} requests/s "
                      f"({t['requests']} segment requests, {what}"
                      f"{', %d errors' % t['errors'] if t.get('errors') else ''})")


def scene_rows(size: int, preset: str, engines: list[Path], console) -> list[dict]:
    """``scene_<size>`` rows (``benchmarks/scene.py``, each in its own process): the PyTorch
    preset and every build in process, and the first build through ``egx serve``. ``median_ms``
    / ``p95_ms`` per tile (its predict call, or its request through the server, where 4 are
    in flight); ``tiles_per_s``; ``peak_rss_mb`` of the process that read the scene
    (and ``worker_peak_rss_mb`` of the server's workers)."""
    from runners.manifest import load_manifest

    from .scene import measure

    runs = [("pytorch", "fp32", None, False)]
    runs += [("onnxruntime", precision_of(load_manifest(e))[0], e, False) for e in engines]
    if engines:
        runs.append(("zmq", precision_of(load_manifest(engines[0]))[0], engines[0], True))
    rows = []
    for backend, precision, folder, served in runs:
        console.print(f"scene {size} x {size}: {backend} {precision} ...")
        r = measure(size, preset, folder, served)
        t = np.asarray(r["tile_ms"])
        rows.append({"stage": f"scene_{size}", "backend": backend, "precision": precision,
                     "median_ms": round(float(np.median(t)), 3), "p95_ms": round(float(np.percentile(t, 95)), 3),
                     "n": len(t), "tiles_per_s": r["tiles_per_s"], "peak_rss_mb": r["peak_rss_mb"],
                     "worker_peak_rss_mb": r["worker_peak_rss_mb"], "scene_raw_mb": r["scene_raw_mb"]})
    return rows


def add_bench_arguments(p) -> None:
    """``egx bench`` / ``python benchmarks/bench.py``."""
    p.add_argument("--preset", choices=("default", "tiny", "edge"), default="default",
                   help="the PyTorch model beside the engines: the shipped trained model (engines/default), "
                        "or a preset")
    p.add_argument("--engines", type=Path, action="append", metavar="DIR",
                   help="build folder, repeatable (default: engines/<preset> and engines/<preset>-int8 if built)")
    p.add_argument("--no-engines", action="store_true", help="benchmark PyTorch only")
    p.add_argument("--no-zmq", action="store_true", help="skip the rows through egx serve")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--scene-sizes", type=int, nargs="*", default=[], metavar="N",
                   help="also whole synthetic scenes of N x N pixels (e.g. 10000 20000): rows scene_N with per-tile "
                        "times, tiles/s and peak RSS, in process and through egx serve (minutes each)")
    p.add_argument("--json", metavar="PATH", help="write the report as JSON")


def main(args) -> int:
    from rich.console import Console

    from earthgptx.data import default_data_root
    from earthgptx.errors import EarthGPTXError
    from runners.manifest import ENGINES_ROOT, MANIFEST

    data = default_data_root()
    engines = list(args.engines or [])
    if not engines and not args.no_engines:
        engines = [ENGINES_ROOT / name for name in (args.preset, f"{args.preset}-int8")
                   if (ENGINES_ROOT / name / MANIFEST).is_file()]
    console = Console(stderr=True)
    if not engines and not args.no_engines:
        console.print(f"no engines for {args.preset} found: build them with python export/build_engines.py "
                      f"--preset {args.preset} (benchmarking PyTorch only)")
    try:
        report = run_bench(args.preset, engines, data, args.repeats, zmq=not args.no_zmq, log=console.file)
    except EarthGPTXError as exc:
        console.print(f"bench failed: {exc}")
        return 1
    for size in args.scene_sizes:
        report["rows"] += scene_rows(size, args.preset, engines, console)
    print_report(report, Console(width=120))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0
