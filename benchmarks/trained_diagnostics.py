"""What a trained checkpoint's parts do on their own, beside `egx eval`'s task metrics: the vision
encoder's classifier alone, the README's SAR example, and the click loss on the two kinds of
click batch that training uses.

``python benchmarks/trained_diagnostics.py --checkpoint runs/run11/model --data ../shared/data --json diag.json``

- ``classifier``: accuracy of the vision encoder's class-word classifier alone (argmax of its
  logits, no LLM) on up to ``--images`` shuffled validation images (``data.split``) of MSTAR
  and AID, preprocessed as inference preprocesses them.
- ``readme``: ``egx predict --checkpoint CKPT`` on the README's SAR example ("Segment the
  ship.", a point at 346,323): the share of the HRSID instance mask under the point that the
  answer's masks cover, and their IoU with it (original frame); as the README runs it (zoomed
  into the window around the point) and with ``--no-zoom`` (the whole chip at the model size).
- ``click``: the click loss (``training.step``: 2 BCE + 2 Dice + IoU-score error) under
  ``no_grad`` on ``--batches`` batches of each kind, batch norm in training mode (batch
  statistics) and in eval mode (running statistics): the warm-up's object batches
  (``training.warmup.VisionImages``, 64 images at the model size, crops, one connected object
  clicked) and the fused steps' batches (``training.loop.StepBatches``: one instruction and
  48 vision items drawn from every dataset, as ``egx train`` draws them, or from the object
  datasets alone).
Prints a table and writes JSON. Needs the checkpoint's classes: a ``small`` checkpoint trained
on the same ``--data``.
"""
from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

README_IMAGE = "sar/hrsid/P0094_0_800_3000_3800.png"
README_POINT = (346, 323)
OBJECT_DATASETS = ("sirst", "sirst-v2", "hrsid-mini", "road-mini")


def classifier_accuracy(model, root: Path, images: int) -> dict[str, float]:
    from earthgptx.data.readers import dataset_samples
    from earthgptx.data.split import Splitter
    from earthgptx.data.templates import readable_class
    from earthgptx.imageio import read_image
    from earthgptx.processing import preprocess

    names = list(model.config.vision.class_names)
    split, out = Splitter(root), {}
    for ds in ("mstar", "aid"):
        val = [s for s in dataset_samples(root, (ds,)) if split(s) == "val" and s.label]
        random.Random(0).shuffle(val)
        val = val[:images]
        right = 0
        for s in val:
            px = preprocess(read_image(s.image).data, s.modality, model.config.vision.image_size).pixel_values
            with torch.no_grad():
                _, _, logits = model.vision_encoder.encode(torch.from_numpy(px))
            right += names[int(logits.argmax(-1))] == readable_class(s.label)
        out[ds] = right / max(1, len(val))
    return out


def readme_example(checkpoint: Path, root: Path, zoom: bool = True) -> dict[str, float]:
    from earthgptx.data.readers import hrsid_sample
    from earthgptx.rle import rle_to_mask

    image = root / README_IMAGE
    x, y = README_POINT
    done = subprocess.run([sys.executable, "-m", "egx", "predict", "--checkpoint", str(checkpoint), "--image",
                           str(image), "--modality", "sar", "--text", "Segment the ship.", "--point", f"{x},{y}",
                           "--json", *([] if zoom else ["--no-zoom"])], capture_output=True, text=True, check=True)
    answer = json.loads(done.stdout)
    truth = next(m for m in hrsid_sample(image.parent, image).masks if m[y, x])
    pred = np.zeros_like(truth)
    for rle in answer["masks"]:
        pred |= rle_to_mask(rle).astype(bool)
    inter, union = int((pred & truth).sum()), int((pred | truth).sum())
    return {"mask_px": int(pred.sum()), "ship_px": int(truth.sum()), "covered": inter / truth.sum(),
            "iou": inter / max(1, union)}


def click_losses(model, tokenizer, root: Path, batches: int) -> dict[str, float]:
    from earthgptx.data.instructions import InstructionMix
    from earthgptx.training.batches import Encoder
    from earthgptx.training.loop import StepBatches, TrainConfig, class_index, load_split
    from earthgptx.training.step import TrainModule
    from earthgptx.training.warmup import VisionImages

    # one instruction beside the 48 vision items: the smallest fused step egx train makes
    cfg = TrainConfig(data=str(root), out="unused", batch_size=1, vision_batch=48)
    train, _ = load_split(cfg)
    classes = class_index(train)
    enc = Encoder(model.config, tokenizer, augment=True, seed=0, classes=classes)
    module = TrainModule(model, torch.from_numpy(enc.prefix_ids), enc.image_id, enc.region_ids,
                         num_classes=len(classes))
    mixes = {"fused, all datasets": InstructionMix(train, seed=0),
             "fused, object datasets": InstructionMix([s for s in train if s.dataset in OBJECT_DATASETS], seed=0)}
    images = VisionImages(mixes["fused, object datasets"], classes, model.config.vision.image_size, log=False)
    kinds = {"warm-up objects": lambda k: images.batch(k, 64, 0, size=images.size, crops=True, clicks=True,
                                                        group="objects"),
             **{name: StepBatches(mix, enc, cfg, 0, 0, 1, tokenizer.pad_token_id or 0).__getitem__
                for name, mix in mixes.items()}}
    out = {}
    for mode in ("train", "eval"):
        module.train(mode == "train")
        module.model.llm.eval()
        with torch.no_grad():
            for name, make in kinds.items():
                out[f"{name}, batch norm {mode}"] = float(np.mean([float(module(*make(k))["click"])
                                                                   for k in range(batches)]))
    return out


def main(argv: list[str] | None = None) -> int:
    from earthgptx.checkpoint import load_checkpoint

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, required=True, help="an egx train model folder")
    p.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    p.add_argument("--images", type=int, default=150, help="validation images per classified dataset")
    p.add_argument("--batches", type=int, default=4, help="click batches of each kind")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    model, tokenizer = load_checkpoint(args.checkpoint)
    model.eval()
    report = {"checkpoint": str(args.checkpoint),
              "classifier": classifier_accuracy(model, args.data, args.images),
              "readme": readme_example(args.checkpoint, args.data),
              "readme, --no-zoom": readme_example(args.checkpoint, args.data, zoom=False),
              "click": click_losses(model, tokenizer, args.data, args.batches)}
    print(f"{'measure':52s} value")
    for group, values in report.items():
        if isinstance(values, dict):
            for k, v in values.items():
                print(f"{group + ': ' + k:52s} {v:.3f}" if isinstance(v, float) else f"{group + ': ' + k:52s} {v}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
