"""How fast does the trained default's vision CNN learn classes from scratch, with group norm
and with batch norm? One run, both side by side on the same machine and thread count.

``python benchmarks/vision_norm.py --data ../shared/data --dataset mstar --minutes 4 --json out.json``

For each normalisation the ``small`` preset's vision encoder (its CNN, projector and class
classifier; ``VisionConfig.norm``) trains on one dataset's training split only, as a
classifier (AdamW, cross-entropy with label smoothing 0.1, a cosine over the time budget),
with the augmentations vision items get in ``egx train`` (quarter turns, a mirror, a crop of
70-100 % of each side resampled to the model size; ``--no-crop`` leaves the crop out). Images
are prepared once as inference prepares them (``processing.preprocess``) and held in memory,
so the time is the network's. Validation accuracy on the dataset's validation split
(``data.split``), every ``--every`` seconds and at the end; for batch norm also after its
statistics are re-estimated on un-augmented training images (``training.batchnorm``, what
``egx train`` does). Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def load(samples: list, size: int, index: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N, 3, size, size)`` float16 pixel values and ``(N,)`` class indices."""
    from earthgptx.imageio import read_image
    from earthgptx.processing import preprocess

    x = np.stack([preprocess(read_image(s.image).data, s.modality, size).pixel_values[0] for s in samples])
    return torch.from_numpy(x.astype(np.float16)), torch.tensor([index[s.label] for s in samples])


def augment(x: torch.Tensor, crop: bool, g: torch.Generator) -> torch.Tensor:
    """One quarter turn and mirror for the batch, and a crop of 70-100 % of each side resampled
    back to the input size (``(B, 3, S, S)``)."""
    x = torch.rot90(x, int(torch.randint(4, (), generator=g)), (2, 3))
    if torch.rand((), generator=g) < 0.5:
        x = x.flip(3)
    if crop:
        size = x.shape[-1]
        s = int(size * (0.7 + 0.3 * float(torch.rand((), generator=g))))
        y0, x0 = (int(v) for v in torch.randint(size - s + 1, (2,), generator=g))
        x = F.interpolate(x[:, :, y0:y0 + s, x0:x0 + s], size=(size, size), mode="bilinear", align_corners=False)
    return x


@torch.no_grad()
def accuracy(encoder, x: torch.Tensor, y: torch.Tensor) -> float:
    encoder.eval()
    right = 0
    for i in range(0, len(x), 64):
        right += int((encoder.encode(x[i:i + 64].float())[2].argmax(-1) == y[i:i + 64]).sum())
    return right / len(x)


def train_one(norm: str, data: tuple, classes: tuple, args) -> dict:
    from earthgptx.config import preset
    from earthgptx.training.batchnorm import recalibrate
    from earthgptx.vision_encoder import VisionEncoder

    xt, yt, xv, yv = data
    cfg = preset("small")
    vision = dataclasses.replace(cfg.vision, norm=norm, class_names=classes, image_size=args.size)
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    encoder = VisionEncoder(vision, cfg.llm.hidden)
    opt = torch.optim.AdamW(encoder.parameters(), lr=args.lr, weight_decay=0.05)
    curve, step, started = [], 0, time.perf_counter()
    budget, next_eval = 60 * args.minutes, args.every
    while (elapsed := time.perf_counter() - started) < budget:
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / 50) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * elapsed / budget)))
        pick = torch.randint(len(xt), (args.batch,), generator=g)
        encoder.train()
        with torch.autocast("cpu", torch.bfloat16):
            logits = encoder.encode(augment(xt[pick].float(), args.crop, g))[2]
        loss = F.cross_entropy(logits.float(), yt[pick], label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if elapsed > next_eval:
            curve.append({"seconds": round(elapsed), "images": step * args.batch, "val_accuracy": accuracy(encoder, xv, yv)})
            print(f"  {norm}: {curve[-1]}", file=sys.stderr, flush=True)
            next_eval += args.every
    row = {"norm": norm, "steps": step, "images": step * args.batch, "val_accuracy": accuracy(encoder, xv, yv),
           "curve": curve}
    if norm == "batch":
        g2 = torch.Generator().manual_seed(args.seed + 1)
        batches = [xt[torch.randint(len(xt), (64,), generator=g2)].float() for _ in range(16)]
        recalibrate(encoder, batches)
        row["val_accuracy_recalibrated"] = accuracy(encoder, xv, yv)
    return row


def main(argv: list[str] | None = None) -> int:
    from earthgptx.data.readers import dataset_samples
    from earthgptx.data.split import Splitter
    from earthgptx.data.templates import readable_class

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--dataset", default="mstar", help="a dataset with classes: mstar or aid")
    ap.add_argument("--minutes", type=float, default=4.0, help="training time per normalisation")
    ap.add_argument("--size", type=int, default=128, help="model input side (the default model: 256)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--every", type=float, default=60.0, help="seconds between validation evaluations")
    ap.add_argument("--no-crop", dest="crop", action="store_false")
    ap.add_argument("--norms", default="group,batch")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    root = Path(args.data)
    split = Splitter(root)
    samples = [s for s in dataset_samples(root, (args.dataset,)) if s.label]
    if not samples:
        print(f"no labelled images of {args.dataset} under {root}", file=sys.stderr)
        return 2
    labels = sorted({s.label for s in samples})
    index = {label: i for i, label in enumerate(labels)}
    train = [s for s in samples if split(s) == "train"]
    val = [s for s in samples if split(s) == "val"]
    t0 = time.perf_counter()
    data = (*load(train, args.size, index), *load(val, args.size, index))
    print(f"{args.dataset}: {len(train)} training, {len(val)} validation images at {args.size} px, "
          f"read in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    classes = tuple(readable_class(label) for label in labels)
    rows = [train_one(norm, data, classes, args) for norm in args.norms.split(",")]
    print(f"\n{args.dataset}, {args.minutes:g} min each, {args.size} px, {args.threads} thread(s), "
          f"crop {'on' if args.crop else 'off'}; validation accuracy ({len(val)} images)")
    print(f"{'norm':<6} {'steps':>6} {'images':>8} {'val accuracy':>13} {'BN re-estimated':>16}")
    for r in rows:
        again = f"{r['val_accuracy_recalibrated']:.3f}" if "val_accuracy_recalibrated" in r else "-"
        print(f"{r['norm']:<6} {r['steps']:>6} {r['images']:>8} {r['val_accuracy']:>13.3f} {again:>16}")
    if args.json:
        args.json.write_text(json.dumps({"dataset": args.dataset, "minutes": args.minutes, "size": args.size,
                                         "crop": args.crop, "threads": args.threads, "validation_images": len(val),
                                         "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
