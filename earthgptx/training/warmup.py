"""``egx train --vision-warmup MIN``: the vision encoder learns alone first.

The paper starts its one-stage fusion training from pretrained vision encoders (DINOv2,
ConvNeXt). None can be downloaded here, so the ``small`` preset's CNN starts from random
weights, and inside the fused steps it learns slowly: every step costs about 3 seconds of an
LLM forward and backward, and the encoder's own heads see ~48 images in it. Measured
(docs/training.md): the encoder trained alone as an AID classifier learned in 5 minutes of
one core what run 4's whole 65-minute run on two cores taught its class head. So for its first
``MIN`` minutes a run trains the encoder on its own, the stand-in for the paper's pretrained
encoders; then the fused steps begin, with every task and modality in each step as before.

What trains here: the vision encoder through its two deep-supervision heads (``step.py``):
the image class (AID, MSTAR) and where all objects are (ships, infrared targets, roads).
Images are prepared once as inference prepares them (``processing.preprocess``) and held in
memory as float16, ``(N, 3, S, S)``: about 0.4 MB an image at 256 px, 2 GB for the ~5,400
such images of ``../shared/data`` in each data-parallel rank; a step then costs only the
network. Each step draws ``batch`` images as vision items are drawn (a dataset by the square
root of its size, then an image), each turned by a random quarter turn and mirrored half of
the time together with its object map. No crops: resampling would change the statistics batch
norm learns (``batchnorm.py``).
"""
from __future__ import annotations

import sys
import time

import numpy as np
import torch

from ..data.instructions import InstructionMix


class VisionImages:
    """The training images that teach the vision encoder, prepared once.

    ``pixels`` ``(N, 3, S, S)`` float16 (model frame); ``labels`` ``(N,)`` int64 class index
    (-1: none); ``objects`` ``(M, S, S)`` float16 coverage of all objects for the images that
    have them, ``object_of`` ``(N,)`` their row in it (-1: none); ``pools`` dataset -> rows.
    """

    def __init__(self, mix: InstructionMix, classes: dict, size: int, log: bool = True) -> None:
        from ..imageio import read_image
        from ..processing import preprocess
        from .batches import object_coverage

        started = time.perf_counter()
        rows = [i for pool in mix.vision_pools.values() for i in pool]
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
        if log:
            print(f"vision warm-up: {len(rows)} images in memory ({self.pixels.nbytes / 2**30:.1f} GiB), "
                  f"prepared in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)

    def batch(self, k: int, n: int, seed: int, rank: int = 0, world: int = 1) -> tuple[dict, dict]:
        """Warm-up step ``k``'s global batch of ``n`` images, this rank's share as a
        ``TrainModule`` batch (no text, no mask queries), and the global counts."""
        rng = np.random.default_rng([seed, k, 2])
        names = sorted(self.pools)
        size = np.sqrt([len(self.pools[d]) for d in names])
        picks = []
        for _ in range(n):
            pool = self.pools[names[int(rng.choice(len(names), p=size / size.sum()))]]
            picks.append((pool[int(rng.integers(len(pool)))], int(rng.integers(4)), bool(rng.random() < 0.5)))
        mine = picks[rank::world]

        def turn(a: torch.Tensor, quarter: int, mirror: bool) -> torch.Tensor:
            a = torch.rot90(a, quarter, (-2, -1))
            return a.flip(-1) if mirror else a

        pixels = torch.stack([turn(self.pixels[i], q, m) for i, q, m in mine]).float()
        labels = self.labels[[i for i, _, _ in mine]]
        ob = [(r, i, q, m) for r, (i, q, m) in enumerate(mine) if self.object_of[i] >= 0]
        batch = {"pixel_values": pixels, "labels_cls": labels, "text_rows": torch.zeros(0, dtype=torch.long),
                 "size": len(mine), "tasks": ["vision"] * len(mine)}
        if ob:
            batch["object_rows"] = torch.tensor([r for r, _, _, _ in ob], dtype=torch.long)
            batch["objects"] = torch.stack([turn(self.objects[self.object_of[i]], q, m) for _, i, q, m in ob]).float()
        return batch, {"tokens": 1, "masks": 1, "clicks": 1, "images": n}


def warm_up_vision(net, module, images: VisionImages, minutes: float, batch: int, lr: float, seed: int,
                   rank: int, world: int, device: torch.device, autocast, all_sum, main: bool) -> int:
    """Train ``module``'s vision encoder (and its training-only heads) alone for ``minutes``;
    ``net`` is ``module`` or its DDP wrapper. Returns the steps taken (the same on every rank)."""
    params = [p for name, p in module.named_parameters() if p.requires_grad and (
        name.startswith("model.vision_encoder.") or name.startswith("aux_"))]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05, betas=(0.9, 0.95))
    started = time.perf_counter()
    k, shown = 0, 0.0
    while True:
        elapsed = time.perf_counter() - started
        if all_sum([float(elapsed >= 60 * minutes)])[0] > 0:  # every rank stops at the same step
            break
        b, counts = images.batch(k, batch, seed, rank, world)
        b = {key: v.to(device) if torch.is_tensor(v) else v for key, v in b.items()}
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (k + 1) / 50)
        with autocast:
            losses = net(b, counts)
        opt.zero_grad(set_to_none=True)
        (losses["loss"] * world).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        k += 1
        now = time.perf_counter() - started
        if main and (now - shown > 30 or k == 1):
            shown = now
            print(f"vision warm-up: step {k}, {now / 60:.1f}/{minutes:g} min, "
                  f"class {float(losses['aux_class'].detach()):.3f}, objects {float(losses['aux_dense'].detach()):.3f}, "
                  f"{k * batch / now:.0f} images/s", file=sys.stderr, flush=True)
    module.zero_grad(set_to_none=True)
    return k
