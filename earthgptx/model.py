"""EarthGPT-X, the PyTorch reference: the four parts, built from a config.

``build_model(config)`` makes the model and its tokenizer (seeded random weights where
no real ones exist; the LLM from SmolLM2's GGUF or a local folder when the config
says so). ``paper`` is built on the meta device: shapes and parameter counts only.
Checkpoints (``config.json`` + ``model.safetensors`` + tokenizer files) are handled
in ``checkpoint.py``.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import LlamaForCausalLM

from .config import PART_NAMES, ModelConfig
from .errors import CheckpointError
from .llm import LLM, llama_config
from .pixel_decoder import PixelDecoder
from .prompt_encoder import PromptEncoder
from .prompting import special_tokens
from .vision_encoder import VisionEncoder, set_class_words
from .weights import llm_state_dict, load_tokenizer


class EarthGPTX(nn.Module):
    """The four parts under their deployment names; each has its own tensor interface
    (see the part modules' docstrings)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        h = config.llm.hidden
        self.vision_encoder = VisionEncoder(config.vision, h)
        self.prompt_encoder = PromptEncoder(config.prompt, h)
        self.pixel_decoder = PixelDecoder(config.pixel, config.vision, h)
        vocab = config.llm.vocab_size + len(special_tokens(config.prompt.max_regions))
        self.llm = LLM(LlamaForCausalLM(llama_config(config.llm, vocab)))

    def parts(self) -> dict[str, nn.Module]:
        return {name: getattr(self, name) for name in PART_NAMES}


def parameter_counts(model: EarthGPTX) -> dict[str, int]:
    """Parameters per part and in total (tied weights counted once)."""
    counts = {name: sum(p.numel() for p in part.parameters()) for name, part in model.parts().items()}
    counts["total"] = sum(p.numel() for p in model.parameters())
    return counts


def build_skeleton(config: ModelConfig, device: str | torch.device | None = None) -> EarthGPTX:
    """The model with seeded random weights and nothing loaded (``device="meta"``: no memory)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        if device is not None:
            with torch.device(device):
                model = EarthGPTX(config)
        else:
            model = EarthGPTX(config)
    return model.eval()


def build_model(config: ModelConfig):
    """Model + tokenizer for a config. Real LLM weights are loaded where the config
    names them; everything else is random, seeded by ``config.seed``; class words
    (``VisionConfig.class_names``) are the LLM's embeddings of the class names."""
    if config.llm.tokenizer is None:
        raise CheckpointError(f"preset {config.preset!r} has no tokenizer and no weights: it is for sizes only "
                              "(egx info); use --preset tiny or edge to run the model")
    tokenizer = load_tokenizer(config.llm.tokenizer, special_tokens(config.prompt.max_regions))
    model = build_skeleton(config)
    expected = model.llm.embed_table.shape[0]
    if len(tokenizer) != expected:
        raise CheckpointError(f"tokenizer has {len(tokenizer)} tokens but the LLM expects {expected} "
                              f"(base vocabulary {config.llm.vocab_size} + special tokens): use the matching tokenizer")
    if config.llm.weights != "random":
        load_llm_weights(model, config.llm.weights, seed=config.seed)
    if config.vision.class_names:  # derived from the LLM's table: fill it once the table is final
        set_class_words(model.vision_encoder, model.llm.embed_table, tokenizer)
    return model, tokenizer


def load_llm_weights(model: EarthGPTX, source: str, seed: int) -> None:
    """Copy a base Llama's weights into the LLM part. The rows of the added special
    tokens start at the mean of the base embeddings plus seeded noise."""
    state = llm_state_dict(source)
    lm = model.llm.model
    table = lm.get_input_embeddings().weight
    base = state.pop("model.embed_tokens.weight")
    if base.shape[1] != table.shape[1] or base.shape[0] > table.shape[0]:
        raise CheckpointError(f"LLM weights from {source} have embeddings {tuple(base.shape)}; "
                              f"this config expects width {table.shape[1]} and at most {table.shape[0]} rows")
    head = state.pop("lm_head.weight", None)
    missing, unexpected = lm.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in ("model.embed_tokens.weight", "lm_head.weight")]
    if missing or unexpected:
        raise CheckpointError(f"LLM weights from {source} do not match the config: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        n = base.shape[0]
        table[:n] = base
        noise = torch.randn(table.shape[0] - n, table.shape[1], generator=gen) * base.std(dim=0)
        table[n:] = base.mean(dim=0) + 0.1 * noise
        if not model.config.llm.tie_embeddings:
            out = lm.get_output_embeddings().weight
            out[:n] = base if head is None else head
            out[n:] = table[n:]
