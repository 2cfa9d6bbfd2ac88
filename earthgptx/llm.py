"""``llm``: a Llama-family decoder over ``inputs_embeds`` with an explicit KV cache.

Image tokens and region tokens are spliced into the text embeddings before this part
(``prompting.splice``), so its input is always embeddings, never token ids. One
interface serves prefill and decode.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from .config import LLMConfig

INPUT_NAMES = ("inputs_embeds", "attention_mask", "position_ids")
OUTPUT_NAMES = ("logits", "last_hidden_state")


def kv_names(layers: int, prefix: str) -> list[str]:
    """``[f"{prefix}.0.key", f"{prefix}.0.value", ...]``; prefix is ``past_key_values`` or ``present``."""
    return [f"{prefix}.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]


def llama_config(cfg: LLMConfig, vocab_size: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_dim, max_position_embeddings=cfg.max_positions, rms_norm_eps=cfg.rms_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=cfg.tie_embeddings, attention_bias=False, mlp_bias=False,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )


class LLM(nn.Module):
    """Embeddings + KV cache -> last-position logits, hidden states, new KV.

    Inputs:
      ``inputs_embeds``  ``(B, T, hidden)`` float32;
      ``attention_mask`` ``(B, P + T)`` int64, 1 = real token, 0 = left padding;
      ``position_ids``   ``(B, T)`` int64, ``cumsum(attention_mask) - 1`` for the new tokens;
      ``past_key_values.{i}.key|value`` ``(B, kv_heads, P, head_dim)`` float32 per layer
                         (absent, or ``P = 0``, at prefill).
    Outputs:
      ``logits`` ``(B, vocab)`` float32 at the last position only (prefill of ~300
                 image tokens would otherwise return ~60 MB of logits);
      ``last_hidden_state`` ``(B, T, hidden)`` float32 after the final norm (the
                 ``[SEG]`` state is read here);
      ``present.{i}.key|value`` ``(B, kv_heads, P + T, head_dim)`` float32.
    """

    def __init__(self, model: LlamaForCausalLM) -> None:
        super().__init__()
        self.model = model
        self.num_layers = model.config.num_hidden_layers

    @property
    def embed_table(self) -> torch.Tensor:
        """``(vocab, hidden)`` token-embedding table used to embed text ids."""
        return self.model.get_input_embeddings().weight

    def decoder(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                past: tuple[torch.Tensor, ...] = ()) -> tuple[torch.Tensor, DynamicCache]:
        """The decoder stack: ``(B, T, hidden)`` last hidden states (after the final norm) and
        the cache holding past + new KV. Shared by ``forward`` and training."""
        if past and len(past) != 2 * self.num_layers:
            raise ValueError(f"expected {2 * self.num_layers} past KV tensors, got {len(past)}")
        pairs = [(past[2 * i], past[2 * i + 1]) for i in range(self.num_layers)] if past else None
        cache = DynamicCache(pairs, config=self.model.config) if pairs else DynamicCache(config=self.model.config)
        out = self.model.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                               position_ids=position_ids, cache=cache, use_cache=True)
        return out.last_hidden_state, cache

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        hidden, cache = self.decoder(inputs_embeds, attention_mask, position_ids, past)
        logits = self.model.lm_head(hidden[:, -1])
        present: list[torch.Tensor] = []
        for layer in cache.layers:
            present += [layer.keys, layer.values]
        return (logits, hidden, *present)
