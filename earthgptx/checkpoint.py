"""Checkpoint folders: ``config.json`` (``ModelConfig``), ``model.safetensors`` (every
parameter and buffer of the four parts) and the tokenizer's files. ``save`` then
``load`` round-trips bit-exactly; loading reads only that folder."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from .config import ModelConfig
from .errors import CheckpointError
from .model import EarthGPTX, build_skeleton

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def save_checkpoint(model: EarthGPTX, tokenizer, folder: str | Path) -> Path:
    """Write ``model`` and ``tokenizer`` to ``folder`` (created if needed)."""
    from safetensors.torch import save_model

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    # the weights now live in this folder: no external sources on reload
    cfg = dataclasses.replace(
        cfg, vision=dataclasses.replace(cfg.vision, vit_pretrained=None, cnn_pretrained=None),
        llm=dataclasses.replace(cfg.llm, weights="random", tokenizer="."))
    (folder / CONFIG_FILE).write_text(json.dumps({"format": "earthgptx-checkpoint/1", **cfg.to_dict()}, indent=2))
    save_model(model, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    tokenizer.save_pretrained(folder)
    return folder


def load_config(folder: str | Path) -> ModelConfig:
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{folder} is not an EarthGPT-X checkpoint: {CONFIG_FILE} is missing "
                              "(make one with: egx checkpoint --preset edge --out DIR)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc
    data.pop("format", None)
    try:
        return ModelConfig.from_dict(data)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: {exc}") from exc


def load_checkpoint(folder: str | Path):
    """``(model, tokenizer)`` from a checkpoint folder."""
    from safetensors.torch import load_model
    from transformers import AutoTokenizer

    folder = Path(folder)
    config = load_config(folder)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{weights} is missing")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot load the tokenizer files in {folder}: {exc}") from exc
    model = build_skeleton(config)
    try:
        missing, unexpected = load_model(model, str(weights), strict=False)
    except RuntimeError as exc:
        raise CheckpointError(f"{weights} does not fit the config in {folder / CONFIG_FILE}: {exc}") from exc
    if missing or unexpected:
        raise CheckpointError(f"{weights} does not fit its config: missing {sorted(missing)[:5]}, "
                              f"unexpected {sorted(unexpected)[:5]}")
    if len(tokenizer) != model.llm.embed_table.shape[0]:
        raise CheckpointError(f"tokenizer in {folder} has {len(tokenizer)} tokens, the LLM {model.llm.embed_table.shape[0]}")
    return model, tokenizer


def load_reference(preset_name: str | None = None, checkpoint: str | Path | None = None):
    """``(model, tokenizer)`` from a preset name or a checkpoint folder (exactly one)."""
    from .config import preset
    from .model import build_model

    if (preset_name is None) == (checkpoint is None):
        raise CheckpointError("give exactly one of a preset (--preset tiny|edge) or a checkpoint folder (--checkpoint DIR)")
    if checkpoint is not None:
        return load_checkpoint(checkpoint)
    return build_model(preset(preset_name))
