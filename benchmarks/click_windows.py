"""Click -> mask IoU against the zoom window's side, on the TRAINING split: how
``processing.ZOOM_FACTORS`` was chosen (validation is never looked at here).

``python benchmarks/click_windows.py --data ../shared/data --limit 30 --json click_windows.json``

For every training image of the object datasets with masks (up to ``--limit`` per dataset, in
``egx eval``'s fixed order), a point inside each of its largest objects (``egx eval``'s
``clicks``) is answered with ``Predictor.predict(task="click")`` on the window
``processing.zoom_window`` gives at each ``--factors`` (in model sides; ``whole``: the whole
image). Prints mean IoU per dataset and window, the best window marked, and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

OBJECT_DATASETS = ("sirst", "sirst-v2", "hrsid-mini", "road-mini")


def click_ious(predictor, samples, factors: list[str]) -> dict[tuple[str, str], list[float]]:
    """``{(dataset, factor): [IoU per click]}``."""
    from earthgptx.evaluation import metrics as M
    from earthgptx.evaluation.run import clicks
    from earthgptx.imageio import read_image
    from earthgptx.processing import VisualPrompts, zoom_window

    size = predictor.config.vision.image_size
    out: dict[tuple[str, str], list[float]] = defaultdict(list)
    started = time.perf_counter()
    for i, s in enumerate(samples):
        image = np.asarray(read_image(s.image).data)
        h, w = image.shape[:2]
        for k, point in clicks(s):
            prompts = VisualPrompts([point], [], [])
            for f in factors:
                window = None if f == "whole" else zoom_window(h, w, prompts, size, float(f))
                options = {} if window is None else {"window": window}
                r = predictor.predict(image, s.modality, "", prompts, task="click", zoom=False, cache=False, **options)
                out[(s.dataset, f)].append(M.mask_iou(r.masks[0], s.masks[k])[2])
        el = time.perf_counter() - started
        print(f"\r{i + 1}/{len(samples)} images, {el:.0f} s", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> int:
    from earthgptx.checkpoint import load_reference
    from earthgptx.data.readers import dataset_samples
    from earthgptx.data.split import Splitter
    from earthgptx.evaluation.run import select
    from earthgptx.predictor import Predictor
    from earthgptx.processing import ZOOM_FACTORS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="an egx train model folder (default: the default model)")
    p.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    p.add_argument("--limit", type=int, default=30, help="training images per dataset")
    p.add_argument("--dataset", action="append", choices=OBJECT_DATASETS, help="default: all object datasets")
    p.add_argument("--factors", nargs="+", default=["0.5", "0.75", "1", "1.5", "2", "3", "whole"],
                   help="window sides in model sides, or 'whole'")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    model, tokenizer = load_reference(None, args.checkpoint)
    predictor = Predictor.from_model(model, tokenizer)
    split = Splitter(args.data)
    names = tuple(args.dataset or OBJECT_DATASETS)
    train = [s for s in dataset_samples(args.data, names) if split(s) == "train" and s.masks]
    samples = select(train, args.limit)
    ious = click_ious(predictor, samples, args.factors)
    modality = {s.dataset: s.modality for s in samples}
    print(f"{'dataset':11s} {'modality':9s} {'clicks':>6s}  " + "  ".join(f"{f:>6s}" for f in args.factors)
          + "   (mean IoU per window side in model sides; * best; in use: ZOOM_FACTORS)")
    rows = []
    for ds in names:
        means = {f: float(np.mean(ious[(ds, f)])) for f in args.factors if ious.get((ds, f))}
        if not means:
            continue
        best = max(means, key=means.get)
        print(f"{ds:11s} {modality[ds]:9s} {len(ious[(ds, args.factors[0])]):6d}  "
              + "  ".join(f"{means[f]:.3f}" + ("*" if f == best else " ") for f in args.factors)
              + f"   in use: {ZOOM_FACTORS[modality[ds]]}")
        rows.append({"dataset": ds, "modality": modality[ds], "clicks": len(ious[(ds, args.factors[0])]),
                     "miou": means, "best": best, "in_use": ZOOM_FACTORS[modality[ds]]})
    if args.json:
        args.json.write_text(json.dumps({"checkpoint": str(args.checkpoint or "default"), "split": "train",
                                         "limit": args.limit, "rows": rows}, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
