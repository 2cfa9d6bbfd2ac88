"""``egx train --vision-warmup MIN``: the vision side learns alone first.

The paper starts its one-stage fusion training from pretrained vision encoders (DINOv2,
ConvNeXt). None can be downloaded here, so the ``small`` preset's CNN starts from random
weights, and inside the fused steps it learns slowly: every step costs about 3 seconds of an
LLM forward and backward, and the encoder's own heads see ~48 images in it. Measured
(docs/training.md): the encoder trained alone as an AID classifier learned in 5 minutes of
one core what run 4's whole 65-minute run on two cores taught its class head. So for its first
``MIN`` minutes a run trains what needs no LLM on its own, the stand-in for the paper's
pretrained encoders; then the fused steps begin, with every task and modality in each step.

What trains here: the vision encoder through its two deep-supervision heads (``step.py``):
the image class (AID, MSTAR) and where all objects are (ships, infrared targets, roads); and,
in the object steps, the prompt-driven pixel decoder through **clicks**: a point or a jittered
box on one object of the image (a connected component of its object map) -> that object's
mask, as vision items carry them in the fused steps (an image without objects: a point on the
background -> no mask).

Images are prepared once as inference prepares them (``processing.preprocess``) and held in
memory as float16, ``(N, 3, S, S)``: about 0.4 MB an image at 256 px, 2 GB for the ~5,400
such images of ``../shared/data`` in each data-parallel rank; a step then costs only the
network. Each step draws ``batch`` images as vision items are drawn (a dataset by the square
root of its size, then an image), each turned by a random quarter turn, mirrored half of the
time and cropped to 70-100 % of each side (80 % of the time), together with its object map.

Schedule: **two kinds of step**, each a whole global batch from one group of datasets.
*Object steps* draw from the datasets with object maps (ships, infrared targets, roads) and
always run at the model size, where a 2-3 px infrared target still has pixels and the pixel
decoder's positional grid is its own: they train the dense head and, through **clicks**, the
pixel decoder. *Class steps* draw from the classified datasets (AID, MSTAR); for CNN encoders,
whose input size is free, their first ``LOW_RES_SHARE`` of the minutes run at half the model
size (**progressive resizing**: a quarter of the cost per image), the rest at the model size.
The ranks share one clock and the time object steps took (the means of theirs); a step is an
object step while those have had less than ``OBJECT_SHARE`` of the time. The learning rate
warms up over 50 steps and follows a cosine to 5 % over the minutes, so both kinds train at
the high rate from the start. Crops resampled to the model size change what batch norm sees;
``egx train`` re-estimates the statistics at its end (``batchnorm.py``).
"""
from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable

import numpy as np
import torch
from torch.nn import functional as F

from ..data.instructions import InstructionMix, click_prompt
from ..processing import Letterbox, VisualPrompts, decoder_points

LOW_RES_SHARE = 2 / 3  # of the warm-up's minutes in which class steps run at half the model size (CNN)
OBJECT_SHARE = 0.35  # of the warm-up's time given to object steps (model size, clicks)
PRETRAINED = "model.vision_encoder.conv.backbone."  # parameters that start from ImageNet weights (effnet)
PRETRAINED_LR_SCALE = 0.3  # their share of the warm-up's rate: refined, not overwritten by the new heads' rate
CROP_P = 0.8  # the share of images cropped (as vision items are: batches.augment_geometry)
CLICKS_PER_IMAGE = 3  # distinct objects clicked on an object step's image (the decoder is cheap beside the encoder)


class VisionImages:
    """The training images that teach the vision encoder, prepared once.

    ``pixels`` ``(N, 3, S, S)`` float16 (model frame); ``labels`` ``(N,)`` int64 class index
    (-1: none); ``objects`` ``(M, S, S)`` float16 coverage of all objects for the images that
    have them, ``object_of`` ``(N,)`` their row in it (-1: none); ``pools`` dataset -> rows;
    ``groups``: ``"objects"`` (the datasets with object maps) and ``"classes"`` (the others)
    -> dataset names, each group only if it has a dataset.
    """

    def __init__(self, mix: InstructionMix, classes: dict, size: int, log: bool = True) -> None:
        from ..imageio import read_image
        from ..processing import preprocess
        from .batches import object_coverage

        started = time.perf_counter()
        rows = [i for pool in mix.vision_pools.values() for i in pool]
        self.size = size
        self.pools: dict[str, list[int]] = {}
        pixels, labels, objects, object_of = [], [], [], []
        for n, i in enumerate(rows):
            s = mix.samples[i]
            prepared = preprocess(read_image(s.image).data, s.modality, size)
            pixels.append(torch.from_numpy(prepared.pixel_values[0]).half())
            labels.append(classes.get((s.dataset, s.label), -1) if s.label else -1)
            coverage = object_coverage(s, s.masks, prepared.letterbox, size)
            object_of.append(-1 if coverage is None else len(objects))
            if coverage is not None:
                objects.append(torch.from_numpy(coverage).half())
            self.pools.setdefault(s.dataset, []).append(n)
            if log and (n + 1) % 500 == 0:
                print(f"vision warm-up: prepared {n + 1}/{len(rows)} images", file=sys.stderr, flush=True)
        self.pixels = torch.stack(pixels)
        self.labels = torch.tensor(labels, dtype=torch.long)
        self.objects = torch.stack(objects) if objects else torch.zeros(0, size, size, dtype=torch.float16)
        self.object_of = torch.tensor(object_of, dtype=torch.long)
        with_objects = {d for d, pool in self.pools.items() if any(object_of[n] >= 0 for n in pool)}
        self.groups = {kind: names for kind, names in (
            ("objects", sorted(with_objects)), ("classes", sorted(set(self.pools) - with_objects))) if names}
        if log:
            print(f"vision warm-up: {len(rows)} images in memory ({self.pixels.nbytes / 2**30:.1f} GiB), "
                  f"prepared in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)

    def batch(self, k: int, n: int, seed: int, rank: int = 0, world: int = 1, size: int | None = None,
              crops: bool = False, clicks: bool = False, group: str | None = None) -> tuple[dict, dict]:
        """Warm-up step ``k``'s global batch of ``n`` images, this rank's share as a
        ``TrainModule`` batch (no text), and the global counts.

        ``size``: the side images and object maps are resampled to (default: as prepared);
        ``crops``: crop 70-100 % of each side (``CROP_P`` of the images) before resampling;
        ``clicks``: every image with an object map also carries click queries (``click_batch``: a
        point or box on each of up to ``CLICKS_PER_IMAGE`` connected objects -> its coverage;
        none left: a background point -> no mask);
        ``group``: draw only from that group's datasets (``groups``; default: every dataset)."""
        rng = np.random.default_rng([seed, k, 2])
        names = self.groups[group] if group else sorted(self.pools)
        weight = np.sqrt([len(self.pools[d]) for d in names])
        full, size = self.size, size or self.size
        picks = []
        for _ in range(n):
            pool = self.pools[names[int(rng.choice(len(names), p=weight / weight.sum()))]]
            i, quarter, mirror = pool[int(rng.integers(len(pool)))], int(rng.integers(4)), bool(rng.random() < 0.5)
            side = int(round(full * rng.uniform(0.7, 1.0))) if crops and rng.random() < CROP_P else full
            y0, x0 = (int(v) for v in rng.integers(full - side + 1, size=2))
            picks.append((i, quarter, mirror, (y0, x0, side), int(rng.integers(2**31))))
        mine = picks[rank::world]

        def view(a: torch.Tensor, quarter: int, mirror: bool, crop: tuple, area: bool) -> torch.Tensor:
            """``(C, S, S)`` -> turned, mirrored, cropped and resampled ``(C, size, size)`` float32."""
            y0, x0, side = crop
            a = torch.rot90(a[:, y0:y0 + side, x0:x0 + side].float(), quarter, (-2, -1))
            a = a.flip(-1) if mirror else a
            if side == size:
                return a
            if area and side > size:  # coverage stays coverage: the mean over each output cell
                return F.interpolate(a[None], size=(size, size), mode="area")[0]
            return F.interpolate(a[None], size=(size, size), mode="bilinear", align_corners=False,
                                 antialias=side > size)[0]

        pixels = torch.stack([view(self.pixels[i], q, m, c, False) for i, q, m, c, _ in mine])
        labels = self.labels[[p[0] for p in mine]]
        ob = [(r, view(self.objects[self.object_of[p[0]]][None], *p[1:4], True)[0], p[4])
              for r, p in enumerate(mine) if self.object_of[p[0]] >= 0]
        batch = {"pixel_values": pixels, "labels_cls": labels, "text_rows": torch.zeros(0, dtype=torch.long),
                 "size": len(mine), "tasks": ["vision"] * len(mine)}
        counts = {"tokens": 1, "masks": 1, "clicks": 1, "images": n}
        if ob:
            batch["object_rows"] = torch.tensor([r for r, _, _ in ob], dtype=torch.long)
            batch["objects"] = torch.stack([o for _, o, _ in ob])
        if clicks:
            counts["clicks"] = max(1, sum(int(self.object_of[p[0]] >= 0) for p in picks))
            if ob:
                batch.update(click_batch([(r, o, np.random.default_rng([seed, k, 3, s])) for r, o, s in ob]))
        return batch, counts


def click_batch(items: list[tuple[int, torch.Tensor, np.random.Generator]]) -> dict:
    """Click queries for ``(row, (S, S) object coverage, rng)`` items, as ``collate`` lays out
    mask queries: up to ``CLICKS_PER_IMAGE`` distinct connected objects of each map are clicked
    (``click_prompt``: a point on it or its jittered box, model frame), each with its coverage as
    the target; a map without objects gets a uniform background point and an empty target.
    ``click_weight`` ``(Q,)``: 1 / the image's query count, so that each image weighs one click
    in the loss whatever its object count (the global normaliser stays the images with objects)."""
    import cv2

    from .batches import point_groups

    rows, points, targets, weights = [], [], [], []
    for row, coverage, rng in items:
        size = coverage.shape[-1]
        count, parts = cv2.connectedComponents((coverage.numpy() > 0).astype(np.uint8), connectivity=8)
        if count > 1:
            picked = rng.permutation(np.arange(1, count))[:CLICKS_PER_IMAGE]
            for label in picked:
                part = parts == int(label)
                points.append(decoder_points(click_prompt(part, rng), Letterbox(size, size, size)))
                targets.append(coverage * torch.from_numpy(part))
                rows.append(row)
                weights.append(1.0 / len(picked))
        else:
            point = VisualPrompts([(float(rng.uniform(0, size)), float(rng.uniform(0, size)))], [], [])
            points.append(decoder_points(point, Letterbox(size, size, size)))
            targets.append(torch.zeros_like(coverage))
            rows.append(row)
            weights.append(1.0)
    return {"mask_rows": torch.tensor(rows, dtype=torch.long),
            "seg_pos": torch.full((len(rows),), -1, dtype=torch.long),
            "mask_vision": torch.ones(len(rows), dtype=torch.bool),
            "click_weight": torch.tensor(weights, dtype=torch.float32),
            "targets": torch.stack(targets),
            "point_groups": point_groups(points)}


def warm_up_vision(net, module, images: VisionImages, minutes: float, batch: int, lr: float, seed: int,
                   rank: int, world: int, device: torch.device, autocast, all_sum, main: bool,
                   clock: Callable[[], float] = time.perf_counter) -> int:
    """Train ``module``'s vision encoder (and its training-only heads) and, in the object
    steps, its pixel decoder on clicks, alone for ``minutes``; ``net`` is ``module`` or its DDP wrapper.
    ``clock``: seconds, for the schedule, the share of object steps and the stop (tests pass one
    that advances a fixed time per step, so that what they check does not hang on the machine's speed).
    Returns the steps taken (the same on every rank: the clock is the ranks' mean)."""
    named = [(name, p) for name, p in module.named_parameters() if p.requires_grad and (
        name.startswith(("model.vision_encoder.", "model.pixel_decoder.", "aux_")))]
    params = [p for _, p in named]
    pretrained = [p for name, p in named if name.startswith(PRETRAINED)]
    opt = torch.optim.AdamW([{"params": [p for name, p in named if not name.startswith(PRETRAINED)], "scale": 1.0},
                             {"params": pretrained, "scale": PRETRAINED_LR_SCALE}],
                            lr=lr, weight_decay=0.05, betas=(0.9, 0.95))
    full = images.size
    low = full // 2 if module.model.config.vision.pyramid else full
    started = clock()
    k, shown, on_objects, seen = 0, 0.0, 0.0, {}
    while True:
        # every rank: the same clock and the same kind of step (the means of the ranks' times)
        elapsed, objects_s = (v / world for v in all_sum([clock() - started, on_objects]))
        if elapsed >= 60 * minutes:
            break
        t = elapsed / (60 * minutes)
        group = "objects" if "objects" in images.groups and (
            "classes" not in images.groups or objects_s < OBJECT_SHARE * elapsed) else "classes"
        size = full if group == "objects" or t >= LOW_RES_SHARE else low
        began = clock()
        b, counts = images.batch(k, batch, seed, rank, world, size=size, crops=True, clicks=group == "objects",
                                 group=group)
        b = {key: v.to(device) if torch.is_tensor(v) else v for key, v in b.items()}
        if "point_groups" in b:
            b["point_groups"] = [tuple(v.to(device) for v in g) for g in b["point_groups"]]
        for g in opt.param_groups:
            g["lr"] = g["scale"] * lr * min(1.0, (k + 1) / 50) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))
        with autocast:
            losses = net(b, counts)
        opt.zero_grad(set_to_none=True)
        (losses["loss"] * world).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        k += 1
        on_objects += clock() - began if group == "objects" else 0.0
        seen[group, size] = seen.get((group, size), 0) + batch
        now = clock() - started
        if main and (now - shown > 30 or k == 1):
            shown = now
            print(f"vision warm-up: step {k}, {now / 60:.1f}/{minutes:g} min ({objects_s / max(elapsed, 1e-9):.0%} "
                  f"on objects), {group} at {size} px, "
                  f"lr {opt.param_groups[0]['lr']:.2e}, class {float(losses['aux_class'].detach()):.3f}, "
                  f"objects {float(losses['aux_dense'].detach()):.3f}, click {float(losses['click'].detach()):.3f}, "
                  f"{k * batch / now:.0f} images/s", file=sys.stderr, flush=True)
    if main:
        print("vision warm-up: " + ", ".join(f"{n} {g} images at {s} px" for (g, s), n in sorted(seen.items())),
              file=sys.stderr)
    module.zero_grad(set_to_none=True)
    return k
