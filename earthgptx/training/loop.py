"""``egx train``: one-stage training over every modality and task at once.

Every step draws its global batch of instructions from ``InstructionMix`` seeded by
``(seed, step)``: tasks by weight, datasets by the square root of their size, so optical,
SAR and infrared samples of every task level meet in each step (cross-domain one-stage
fusion training). Under ``torchrun`` each rank takes every ``world``-th item of that same
global batch and DDP averages gradients (gloo on CPU, NCCL on GPU); the losses are
normalised by global counts, so N processes compute what one process computes at the same
global batch. Rank 0 logs and checkpoints.

Out folder: ``state.pt`` (trainable tensors, optimizer, scheduler, RNG, step: resumed
automatically), ``model/`` (an ``egx`` checkpoint: ``egx predict --checkpoint OUT/model``),
``log.csv`` (one row per logged step) and ``loss.png`` at the end.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..config import NORMS
from ..data.instructions import TASK_WEIGHTS, InstructionMix, clicks_on
from ..data.readers import dataset_samples
from ..data.split import Splitter
from ..errors import InputError
from .batches import NO_TEXT, Encoder, collate
from .step import WEIGHTS, TrainModule

LOG_FIELDS = ("step", "seconds", "lr", "loss", *WEIGHTS, "samples_per_s")
WARMUP_BATCH = 64  # global images per --vision-warmup step (warmup.py)
BN_IMAGES = 512  # training images the vision encoder's batch-norm statistics are re-estimated on (batchnorm.py)


@dataclass
class TrainConfig:
    """Everything a run depends on (written to ``OUT/train_config.json``)."""

    data: str
    out: str
    preset: str = "small"
    steps: int = 2000
    batch_size: int = 16  # global: summed over data-parallel ranks
    vision_batch: int = 48  # global: images per step that never reach the LLM (training-only heads, clicks)
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup: int = 100
    seed: int = 0
    device: str = "cpu"
    workers: int = 0
    datasets: tuple[str, ...] | None = None
    task_weights: dict[str, float] = field(default_factory=lambda: dict(TASK_WEIGHTS))
    checkpoint_every: int = 250
    log_every: int = 10
    time_limit_min: float | None = None
    lora_rank: int = 0  # 0: the LLM frozen; r > 0: LoRA of rank r on every LLM linear layer
    lora_lr: float = 5e-4
    precision: str = "auto"  # "bf16" autocast, "fp32", or "auto": bf16 on CUDA and on CPUs with AMX (use_bf16)
    fsdp: bool = False  # shard parameters, gradients and optimizer state over torchrun ranks (fsdp.py)
    llm: str | None = None  # a Hugging Face Llama folder as the base LLM instead of the preset's
    class_words: bool = True  # the vision encoder's classifier feeds class-name words to the LLM
    vision_norm: str | None = None  # the vision CNN's "group" or "batch" norm; None: the preset's
    vision_warmup: float = 0.0  # minutes the vision encoder trains alone before the fused steps (warmup.py)
    vision_lr: float | None = None  # the vision encoder's peak learning rate in the fused steps (None: lr)
    pixel_lr: float | None = None  # the pixel decoder's peak learning rate in the fused steps (None: lr)

    def model_config(self, class_names: tuple[str, ...] = ()):
        """The preset's ``ModelConfig``, with the LLM of ``llm`` where one is named, a vision
        classifier over ``class_names`` (with ``class_words``: the training data's classes) and
        the CNN normalisation ``vision_norm`` where one is named."""
        from ..config import preset
        from ..weights import llm_config_from_folder

        config = preset(self.preset)
        if self.llm:
            config = dataclasses.replace(config, llm=llm_config_from_folder(self.llm))
        if self.class_words and class_names:
            config = dataclasses.replace(config, vision=dataclasses.replace(config.vision, class_names=class_names))
        if self.vision_norm is not None:
            if config.vision.kind != "cnn":
                raise InputError(f"--vision-norm applies to the CNN vision encoder of the small preset, "
                                 f"not to {self.preset}'s {config.vision.kind!r} encoder")
            config = dataclasses.replace(config, vision=dataclasses.replace(config.vision, norm=self.vision_norm))
        return config

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise InputError("--steps and --batch-size must be at least 1")
        if self.vision_batch < 0:
            raise InputError("--vision-batch must be 0 or more")
        if self.lora_rank < 0:
            raise InputError("--lora-rank must be 0 (LLM frozen) or positive")
        if self.vision_norm not in (None, *NORMS):
            raise InputError(f"--vision-norm must be one of {', '.join(NORMS)}, not {self.vision_norm!r}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise InputError(f"--precision must be auto, bf16 or fp32, not {self.precision!r}")
        if self.vision_warmup < 0 or (self.time_limit_min is not None and self.vision_warmup >= self.time_limit_min):
            raise InputError("--vision-warmup must be 0 or more minutes, and less than --time-limit")
        if self.vision_lr is not None and not self.vision_lr > 0:
            raise InputError("--vision-lr must be a positive learning rate")
        if self.pixel_lr is not None and not self.pixel_lr > 0:
            raise InputError("--pixel-lr must be a positive learning rate")


def param_groups(module, cfg: TrainConfig) -> list[dict]:
    """AdamW groups of ``module``'s trained parameters, each with its ``scale`` of the scheduled
    learning rate: matrices with weight decay, the rest (and the added token rows) without, the
    LoRA factors at ``lora_lr``; with ``vision_lr`` the vision encoder's own two groups at it and
    with ``pixel_lr`` the pixel decoder's (after a warm-up, which trains both, so that the fused
    steps refine what it taught them rather than restart it)."""
    lora = {id(p) for p in module.lora}
    own = []  # (parameter ids, scale) of the parts with a rate of their own
    for part, rate in ((module.model.vision_encoder, cfg.vision_lr), (module.model.pixel_decoder, cfg.pixel_lr)):
        if rate is not None:
            own.append(({id(p) for p in part.parameters()}, rate / cfg.lr))
    taken = lora.union(*(ids for ids, _ in own))
    parts = [(lambda p: id(p) not in taken, 1.0)] + [(lambda p, ids=ids: id(p) in ids, scale) for ids, scale in own]
    groups = []
    for members, scale in parts:
        trained = [p for p in module.parameters() if p.requires_grad and members(p)]
        decay = [p for p in trained if p.ndim >= 2 and p is not module.added]
        no_decay = [p for p in trained if p.ndim < 2 or p is module.added]
        groups += [{"params": decay, "weight_decay": cfg.weight_decay, "scale": scale},
                   {"params": no_decay, "weight_decay": 0.0, "scale": scale}]
    if module.lora:
        groups.append({"params": module.lora, "weight_decay": 0.0, "scale": cfg.lora_lr / cfg.lr})
    return groups


def class_index(samples: list) -> dict[tuple[str, str], int]:
    """``(dataset, label) -> class index`` over the labelled ``samples``, sorted (the order of the
    vision classifier's outputs and of ``VisionConfig.class_names``)."""
    return {key: i for i, key in enumerate(sorted({(s.dataset, s.label) for s in samples if s.label}))}


def class_names(classes: dict[tuple[str, str], int]) -> tuple[str, ...]:
    """The answer form of each class (``templates.readable_class``), in index order."""
    from ..data.templates import readable_class

    return tuple(readable_class(label) for (_, label), _ in sorted(classes.items(), key=lambda kv: kv[1]))


def use_bf16(precision: str, device: torch.device) -> bool:
    """bf16 autocast for ``precision``; ``auto`` means on CUDA, and on CPUs with AMX tiles, where
    bf16 matrix products run on the tile unit (measured: 1.3-1.5 s a step instead of 2.1-3.3 s in
    fp32). AVX512-BF16 without AMX is not enough: on such a 2-core Xeon a data-parallel step of
    the ``small`` model took 12.4 s under bf16 autocast and 8.6 s in fp32 (docs/training.md)."""
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return True
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return device.type == "cpu" and amx is not None and bool(amx())


def lr_at(step: int, cfg: TrainConfig, elapsed_s: float = 0.0) -> float:
    """Linear warm-up, then cosine decay to 5 % of ``lr`` over ``steps`` or, with a time limit,
    over whichever of ``steps`` and ``time_limit_min`` runs out first (so a time-boxed run
    still ends at a low learning rate)."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    if cfg.time_limit_min:  # the time after a --vision-warmup is the fused steps' own
        t = max(t, (elapsed_s - 60.0 * cfg.vision_warmup) / (60.0 * (cfg.time_limit_min - cfg.vision_warmup)))
    return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


class StepBatches(torch.utils.data.Dataset):
    """Item ``i`` is this rank's collated batch of step ``first + i`` (so ``DataLoader``
    workers prepare the next steps while the current one trains), with the global counts
    the losses are normalised by."""

    def __init__(self, mix: InstructionMix, encoder: Encoder, cfg: TrainConfig, first: int, rank: int, world: int,
                 pad_id: int) -> None:
        self.mix, self.encoder, self.cfg = mix, encoder, cfg
        self.first, self.rank, self.world, self.pad_id = first, rank, world, pad_id

    def __len__(self) -> int:
        return self.cfg.steps - self.first

    def __getitem__(self, i: int) -> tuple[dict, dict]:
        step = self.first + i
        insts = self.mix.epoch(step, self.cfg.batch_size) + self.mix.images(step, self.cfg.vision_batch)
        tokens = sum(int((self.encoder.text_ids(x)[1] != -100).sum()) for x in insts if x.task not in NO_TEXT)
        masks = sum(x.target is not None for x in insts)
        clicks = sum(clicks_on(x) for x in insts)
        images = len(insts)
        items = [self.encoder(x, rng=np.random.default_rng([self.cfg.seed, step, self.rank + k * self.world]))
                 for k, x in enumerate(insts[self.rank::self.world])]
        return collate(items, self.pad_id), {"tokens": max(tokens, 1), "masks": max(masks, 1), "clicks": max(clicks, 1),
                                                "images": images}


class _Dist:
    """Rank and world from ``torchrun``'s environment; one process otherwise."""

    def __init__(self, device: str) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local = int(os.environ.get("LOCAL_RANK", "0"))
        if self.world > 1:
            import torch.distributed as dist

            from datetime import timedelta

            # a rank that stops answering fails the others after this, instead of hanging them
            dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", timeout=timedelta(minutes=10))

    def all_sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def close(self) -> None:
        """Every rank waits here until rank 0 has saved, then all leave together: a rank that
        destroyed its process group while another still held it sometimes hung the run's
        exit (seen once with two test suites sharing 2 cores; destroy_process_group's known
        hang, pytorch/pytorch#75097)."""
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()
            dist.destroy_process_group()


def _progress(step: int, total: int, started: float, row: dict, tty: bool, limit_min: float | None) -> None:
    """One progress line; ``started`` counts the time of the run before a resume too."""
    done = step + 1
    elapsed = time.perf_counter() - started
    eta = elapsed / max(done, 1) * (total - step - 1)
    if limit_min is not None:
        eta = min(eta, max(0.0, 60 * limit_min - elapsed))
    bar = "#" * int(20 * (step + 1) / total)
    line = (f"train [{bar:<20s}] {step + 1}/{total} loss {row['loss']:.3f} (text {row['text']:.3f}, "
            f"bce {row['mask_bce']:.3f}, dice {row['mask_dice']:.3f}, click {row['click']:.3f}, "
            f"aux {row['aux_class']:.2f}/{row['aux_dense']:.2f}) "
            f"{row['samples_per_s']:.1f} samples/s "
            f"ETA {int(eta // 60)}:{int(eta % 60):02d}")
    print(("\r" + line) if tty else line, end="" if tty else "\n", file=sys.stderr, flush=True)


def load_split(cfg: TrainConfig) -> tuple[list, list]:
    """``(train, val)`` samples under ``cfg.data`` (every dataset found, or ``cfg.datasets``)."""
    root = Path(cfg.data)
    if not root.is_dir():
        raise InputError(f"training data folder not found: {root} (the layout of ../shared/data, see SOURCES.md)")
    split = Splitter(root)
    samples = list(dataset_samples(root, cfg.datasets))
    train = [s for s in samples if split(s) == "train"]
    val = [s for s in samples if split(s) == "val"]
    if not train:
        raise InputError(f"no training images found under {root}")
    return train, val


def train(cfg: TrainConfig) -> Path:
    """Run (or resume) training; returns the folder of the trained checkpoint."""
    from ..checkpoint import save_checkpoint
    from ..lora import merge_lora
    from ..model import build_model

    dist = _Dist(cfg.device)
    if cfg.fsdp and dist.world == 1:
        raise InputError("--fsdp shards over data-parallel ranks: run it under torchrun --nproc_per_node N (N >= 2)")
    device = torch.device(cfg.device if not cfg.device.startswith("cuda") or dist.world == 1
                          else f"cuda:{dist.local}")
    out = Path(cfg.out)
    main = dist.rank == 0
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    torch.manual_seed(cfg.seed)
    train_samples, _ = load_split(cfg)
    classes = class_index(train_samples)
    model_config = cfg.model_config(class_names(classes))
    model, tokenizer = build_model(model_config)
    if model_config.vision.kind == "effnet":  # ImageNet weights to start from, the first blocks kept
        from ..effnet_lite import load_imagenet

        backbone = model.vision_encoder.conv.backbone
        load_imagenet(backbone)
        backbone.freeze()
    encoder = Encoder(model.config, tokenizer, augment=True, seed=cfg.seed, classes=classes)
    module = TrainModule(model, torch.from_numpy(encoder.prefix_ids), encoder.image_id, encoder.region_ids,
                         num_classes=len(classes), lora_rank=cfg.lora_rank).to(device)
    # build_model returns the model in eval mode: the trained parts must train (batch norm takes
    # batch statistics and updates its running ones only in training mode); the LLM stays in eval
    module.train()
    module.model.llm.eval()
    if cfg.fsdp:
        from .fsdp import shard

        shard(module, device, dist.world)
    mix = InstructionMix(train_samples, cfg.task_weights, seed=cfg.seed)

    params = [p for p in module.parameters() if p.requires_grad]
    groups = param_groups(module, cfg)
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))
    start = 0
    state_path = out / "state.pt"
    if state_path.is_file():
        state = torch.load(state_path, map_location=device, weights_only=False)
        if cfg.fsdp:
            from .fsdp import load_full_state

            load_full_state(module, opt, state["module"], state["optimizer"])
        else:
            module.load_state_dict(state["module"], strict=False)
            opt.load_state_dict(state["optimizer"])
        start = int(state["step"])
        torch.set_rng_state(state["torch_rng"])
        if main:
            print(f"resuming from {state_path} at step {start}", file=sys.stderr)

    net = module
    if dist.world > 1 and not cfg.fsdp:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                      find_unused_parameters=True)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    log_path = out / "log.csv"
    if main and (start == 0 or not log_path.is_file()):
        with open(log_path, "w", newline="") as f:
            csv.writer(f).writerow(LOG_FIELDS)
    tty = sys.stderr.isatty()
    started = time.perf_counter()
    if start:  # a resumed run's clock (log, ETA, time limit) goes on from where it stopped
        started -= _elapsed_before(log_path)
    acc = {k: 0.0 for k in ("loss", *WEIGHTS)}
    acc_n, acc_samples, acc_t = 0, 0, time.perf_counter()
    bf16 = use_bf16(cfg.precision, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    if main:
        print(f"training {sum(p.numel() for p in params) / 1e6:.1f} M parameters "
              f"({'LoRA rank %d on the LLM' % cfg.lora_rank if cfg.lora_rank else 'LLM frozen'}), "
              f"{'bf16 autocast' if bf16 else 'fp32'} on {device}", file=sys.stderr)
    if start == 0 and cfg.vision_warmup > 0:  # a resumed run has done it (its weights hold it)
        from .warmup import VisionImages, warm_up_vision

        images = VisionImages(mix, classes, model_config.vision.image_size, log=main)
        k = warm_up_vision(net, module, images, cfg.vision_warmup, WARMUP_BATCH, cfg.lr / 2, cfg.seed, dist.rank,
                           dist.world, device, autocast, dist.all_sum, main)
        del images
        if main:
            print(f"vision warm-up: {k} steps of {WARMUP_BATCH} images; the fused steps begin", file=sys.stderr)
    step = start
    batches = StepBatches(mix, encoder, cfg, start, dist.rank, dist.world, pad_id)
    loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False, num_workers=cfg.workers,
                                         pin_memory=device.type == "cuda", persistent_workers=False,
                                         prefetch_factor=4 if cfg.workers else None)
    for step, (batch, counts) in enumerate(loader, start):
        batch = _to(batch, device)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg, time.perf_counter() - started) * g["scale"]
        with autocast:
            losses = net(batch, counts)
        opt.zero_grad(set_to_none=True)
        # each rank's loss is its share of the global loss; DDP averages gradients over ranks
        (losses["loss"] * dist.world).backward()
        for p in params:  # a part no item of the step used gets a zero gradient, as DDP gives it
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        vals = dist.all_sum([float(losses[k].detach()) for k in acc])
        for k, v in zip(acc, vals):
            acc[k] += v
        acc_n += 1
        acc_samples += cfg.batch_size
        last = step == cfg.steps - 1
        if (step + 1) % cfg.log_every == 0 or last:
            now = time.perf_counter()
            row = {"step": step + 1, "seconds": round(now - started, 1), "lr": opt.param_groups[0]["lr"],
                   **{k: acc[k] / acc_n for k in acc}, "samples_per_s": acc_samples / max(now - acc_t, 1e-9)}
            if main:
                with open(log_path, "a", newline="") as f:
                    csv.writer(f).writerow([row[k] for k in LOG_FIELDS])
                _progress(step, cfg.steps, started, row, tty, cfg.time_limit_min)
            acc = {k: 0.0 for k in acc}
            acc_n, acc_samples, acc_t = 0, 0, now
        out_of_time = cfg.time_limit_min is not None and time.perf_counter() - started > 60 * cfg.time_limit_min
        out_of_time = dist.all_sum([float(out_of_time)])[0] > 0  # every rank stops at the same step
        if (step + 1) % cfg.checkpoint_every == 0 or last or out_of_time:
            _save(module, opt, step + 1, state_path, cfg.fsdp, main)
        if out_of_time:
            if main:
                print(f"\nstopping at step {step + 1}: --time-limit reached", file=sys.stderr)
            break
    if tty and main:
        print(file=sys.stderr)
    folder = out / "model"
    if cfg.fsdp:  # a plain (unsharded) copy of the trained module, on rank 0, saved as usual
        from .fsdp import full_state

        trained, _ = full_state(module, opt)
        if main:
            model, _ = build_model(model_config)
            module = TrainModule(model, torch.from_numpy(encoder.prefix_ids), encoder.image_id, encoder.region_ids,
                                 num_classes=len(classes), lora_rank=cfg.lora_rank)
            module.load_state_dict(trained, strict=False)
    if main:
        from .batchnorm import recalibrate_vision_encoder

        # un-augmented images drawn as vision items are (an index past the last step's)
        recalibrate_vision_encoder(module.model, [x.sample for x in mix.images(cfg.steps, BN_IMAGES)]
                                   if mix.vision_pools else [])
        module.write_back()
        meta = {"steps": step + 1, "preset": cfg.preset, "seed": cfg.seed, "lora_rank": cfg.lora_rank}
        # a base LLM named by the config stays out of the checkpoint (it loads from there, and
        # LoRA's factors travel beside it); a random one is saved whole, LoRA folded in
        base_llm = module.model.config.llm.weights != "random"
        if not base_llm:
            merge_lora(module.model.llm)
        save_checkpoint(module.model, tokenizer, folder, base_llm=base_llm, metadata=meta)
        plot_log(log_path, out / "loss.png")
    dist.close()
    return folder


def _elapsed_before(log_path: Path) -> float:
    """Seconds a resumed run had already trained (the last ``log.csv`` row)."""
    try:
        with open(log_path) as f:
            rows = list(csv.DictReader(f))
        return float(rows[-1]["seconds"]) if rows else 0.0
    except (OSError, KeyError, ValueError):
        return 0.0


def _to(batch: dict, device: torch.device) -> dict:
    def move(v):
        if torch.is_tensor(v):
            return v.to(device, non_blocking=True)
        if isinstance(v, (list, tuple)) and v and isinstance(v[0], tuple):
            return [tuple(move(t) for t in group) for group in v]
        return v
    return {k: move(v) for k, v in batch.items()}


def _save(module: TrainModule, opt, step: int, path: Path, fsdp: bool, main: bool) -> None:
    """Write ``state.pt`` (rank 0). Under FSDP every rank must call it (the tensors are gathered)."""
    if fsdp:
        from .fsdp import full_state

        trainable, opt_state = full_state(module, opt)
    else:
        trainable = {k: v for k, v in module.state_dict().items() if not k.startswith("model.llm.") or ".lora_" in k}
        opt_state = opt.state_dict()
    if not main:
        return
    tmp = path.with_suffix(".tmp")
    torch.save({"module": trainable, "optimizer": opt_state, "step": step, "torch_rng": torch.get_rng_state()}, tmp)
    os.replace(tmp, path)


def plot_log(log_path: Path, png: Path) -> Path | None:
    """Loss curves of ``log.csv`` as a PNG (matplotlib; skipped with a note if missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no {png.name} (pip install matplotlib); {log_path} has the numbers",
              file=sys.stderr)
        return None
    with open(log_path) as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return None
    steps = [int(r["step"]) for r in rows]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for k in ("loss", *WEIGHTS):
        ax.plot(steps, [float(r[k]) for r in rows], label=k, linewidth=1.5 if k == "loss" else 1.0)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png
