"""Does an INT8 build's accuracy report hold on images the build never saw?

``python benchmarks/int8_heldout.py --engines engines/edge-int8 --data ../shared/data --images 30``

Compares the kept pipeline of the build (its manifest's engines) with the build's own FP32
ONNX files on images of ``--data`` that were neither its calibration nor its evaluation
images (``manifest.json``'s ``accuracy.calibration.images``), sampled as the build samples
(per modality, stratified by dataset and object size, another seed), and prints, per
modality, what the build's report claimed beside what these images give."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def heldout_agreement(folder: Path, data_root: Path, images: int, seed: int) -> dict:
    """``{"claimed": build report, "heldout": report on unseen images, "images": [...]}``;
    reports as ``export.gate.summarize_outcomes``."""
    from calibration.dataset import evaluation_requests
    from calibration.sampling import choose
    from earthgptx.config import PART_NAMES
    from earthgptx.errors import EarthGPTXError
    from earthgptx.predictor import Predictor
    from export.accuracy import Evaluation
    from export.gate import summarize_outcomes
    from runners.engines import open_predictor
    from runners.manifest import load_manifest
    from runners.onnxruntime_runner import OnnxRuntimeRunner

    manifest = load_manifest(folder)
    accuracy = manifest.get("accuracy")
    if accuracy is None:
        raise EarthGPTXError(f"{folder}: not an INT8 build (its manifest has no accuracy section); "
                             "build one with --precision int8 --calibration DIR")
    seen = accuracy["calibration"]["images"]
    exclude = frozenset(k.split("#")[0] for k in seen["calibration"] + seen["evaluation"])
    calset = choose(data_root, evaluation=images, calibration=1, seed=seed, exclude=exclude)
    kept = open_predictor(folder, device="cpu")
    fp32 = Predictor({p: OnnxRuntimeRunner(p, folder / f"{p}.onnx", device="cpu") for p in PART_NAMES},
                     kept.tokenizer, kept.config, kept.embed_table)
    step = max(1, len(calset.evaluation) // 6)

    def progress(what: str, done: int, total: int) -> None:  # minutes at the edge preset
        if done % step == 0 or done == total:
            print(f"{what}: {done}/{total} unseen images", file=sys.stderr, flush=True)

    outcomes = Evaluation(fp32, calset.evaluation, evaluation_requests, progress=progress).compare(kept)
    return {"int8_parts": accuracy["int8_parts"], "claimed": accuracy["per_modality"],
            "heldout": summarize_outcomes(outcomes), "images": [i.key for i in calset.evaluation]}


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    from export.gate import print_report

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engines", type=Path, required=True, help="an INT8 build folder")
    p.add_argument("--data", type=Path, required=True, help="imagery to draw unseen images from")
    p.add_argument("--images", type=int, default=30, help="unseen images per modality")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", type=Path, help="write the result here")
    args = p.parse_args(argv)
    from earthgptx.errors import EarthGPTXError

    try:
        result = heldout_agreement(args.engines, args.data, args.images, args.seed)
    except EarthGPTXError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    console = Console(width=150)
    print_report(result["heldout"], console, f"kept pipeline ({', '.join(result['int8_parts'])} INT8) vs FP32, "
                                             "unseen images")
    for m, claimed in result["claimed"].items():
        c, h = claimed["mask_iou"], result["heldout"].get(m, {}).get("mask_iou")
        if c is None or h is None:
            continue
        holds = "holds" if c["mean"] < 0.98 or h["worst"] >= 0.95 else "DOES NOT HOLD"
        console.print(f"{m}: report mask IoU mean {c['mean']:.4f} (worst {c['worst']:.4f}, n={c['n']}); unseen: mean "
                      f"{h['mean']:.4f}, p5 {h['p5']:.4f}, worst {h['worst']:.4f} (n={h['n']}) -> {holds}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
