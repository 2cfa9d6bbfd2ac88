"""Command line of the build (``python export/build_engines.py`` / ``egx build``)."""
from __future__ import annotations

import argparse
from pathlib import Path

from earthgptx.errors import EarthGPTXError
from earthgptx.processing import MODALITIES

from .limits import ShapeLimits


def add_build_arguments(p: argparse.ArgumentParser) -> None:
    from .gate import Gate

    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", choices=("tiny", "small", "lite", "edge"),
                     help="untrained built-in architecture (default: the trained model that ships, "
                          "earthgptx/default_model, into engines/default)")
    src.add_argument("--checkpoint", metavar="DIR", help="checkpoint folder (e.g. from egx train)")
    p.add_argument("--backend", action="append", default=[], metavar="[PART=]BACKEND",
                   help="onnxruntime (default), tensorrt or tensorrt-llm; for all parts or one (llm=tensorrt-llm)")
    p.add_argument("--precision", action="append", default=[], metavar="[PART=]PRECISION",
                   help="fp32 (default), fp16 or int8; for all parts or one (vision_encoder=int8)")
    p.add_argument("--calibration", type=Path, metavar="DIR", help="calibration imagery for INT8 (e.g. ../shared/data)")
    p.add_argument("--calibration-method", choices=("max", "entropy", "percentile"), default="max")
    p.add_argument("--calibration-modality", choices=MODALITIES,
                   help="modality of calibration images whose folders do not say it")
    p.add_argument("--calibration-images", type=int, default=8, metavar="N",
                   help="INT8: calibration images per modality, sampled from --calibration")
    p.add_argument("--evaluation-images", type=int, default=30, metavar="N",
                   help="INT8: held-out evaluation images per modality for the accuracy gate")
    g = Gate()
    p.add_argument("--gate-mask-iou", type=float, default=g.mask_iou,
                   help="INT8 gate: mean mask IoU per modality, dataset and object size")
    p.add_argument("--gate-box-iou", type=float, default=g.box_iou,
                   help="INT8 gate: mean box IoU per modality, dataset and object size")
    p.add_argument("--gate-p5", type=float, default=g.p5, help="INT8 gate: 5th percentile of mask and box IoU")
    p.add_argument("--gate-token-agreement", type=float, default=g.token_agreement,
                   help="INT8 gate: greedy-token agreement")
    p.add_argument("--gate-answer-agreement", type=float, default=g.answer_agreement,
                   help="INT8 gate: share of (decisive) answers that are the same as FP32's")
    p.add_argument("--out", type=Path, metavar="DIR", help="output folder (default engines/<preset or checkpoint folder name>)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (where engines run and are checked)")
    p.add_argument("--data", type=Path, metavar="DIR",
                   help="images for the parity checks: a folder in the shared layout, or any folder whose sub-folder "
                        "or file names say the modality (sar/, optical/, infrared/); default $EGX_DATA or "
                        "../shared/data, else the sample images shipped with the package")
    d = ShapeLimits()
    p.add_argument("--max-batch", type=int, default=d.max_batch)
    p.add_argument("--max-prompts", type=int, default=d.max_prompts, help="visual prompts per image")
    p.add_argument("--max-queries", type=int, default=d.max_queries, help="mask queries per image")
    p.add_argument("--max-points", type=int, default=d.max_points, help="decoder points per query")
    p.add_argument("--max-seq", type=int, default=d.max_seq, help="tokens per LLM call")
    p.add_argument("--max-kv", type=int, default=d.max_kv, help="past + new tokens")


def options_from_args(args: argparse.Namespace):
    from runners.manifest import BACKENDS, PRECISIONS

    from .build import BuildOptions, per_part
    from .gate import Gate

    opts = BuildOptions(
        preset=args.preset, checkpoint=args.checkpoint,
        backends=per_part(args.backend, BACKENDS, "onnxruntime", "backend"),
        precisions=per_part(args.precision, PRECISIONS, "fp32", "precision"),
        calibration=args.calibration, out=args.out, device=args.device,
        calibration_method=args.calibration_method, calibration_modality=args.calibration_modality,
        calibration_images=args.calibration_images, evaluation_images=args.evaluation_images,
        gate=Gate(args.gate_mask_iou, args.gate_box_iou, args.gate_p5, args.gate_token_agreement,
                  args.gate_answer_agreement),
        limits=ShapeLimits(args.max_batch, args.max_prompts, args.max_queries, args.max_points, args.max_seq,
                           args.max_kv),
    )
    if args.data is not None:
        opts.data_root = args.data
    return opts


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from .build import print_table, run_build
    from .progress import BuildConsole

    console = BuildConsole()
    reports = None
    try:
        reports = run_build(options_from_args(args), console)
    except EarthGPTXError as exc:
        reports = getattr(exc, "reports", None)
        console.print(f"[red]build failed:[/] {exc}", markup=True, highlight=False)
        return 1
    finally:
        if reports:
            print_table(reports, Console(width=120))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="build_engines.py", description="Build EarthGPT-X engines.")
    add_build_arguments(parser)
    return run(parser.parse_args(argv))
