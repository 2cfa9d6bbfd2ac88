"""``prompt_encoder``: visual prompts + image tokens -> region tokens.

Every visual prompt is one row ``r`` with a type (``PROMPT_POINT``, ``PROMPT_BOX``,
``PROMPT_FREEFORM`` or ``PROMPT_PAD``), a box and a raster:
* points and boxes: random-Fourier encoding of the corners plus learned corner/type
  embeddings (SAM style). A point is the box ``[x, y, -1, -1]`` (SPHINX-V convention):
  its second corner gets a learned "no corner" embedding instead.
* free-form (scribble, polygon, mask): its raster goes through the spatial-aware
  encoder (SAE, a small ViT); its box is the shape's tight bounds.
The hybrid fusion (MODEL.md, "multi-modal content integration") then mixes prompts and
image: ``V_sa = SelfAttn(V)``, ``E_ff = FFN(E)``, ``H_ca = CrossAttn(E_ff, V_sa)``,
``hybrid = SelfAttn(H_ca + E_ff)``, ``region_tokens = Proj(hybrid)``.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import Dinov2Config, Dinov2Model

from .config import PromptConfig
from .layers import MLP, Attention, FourierEncoding

INPUT_NAMES = ("image_tokens", "prompt_boxes", "prompt_types", "prompt_masks")
OUTPUT_NAMES = ("region_tokens",)
PROMPT_PAD, PROMPT_POINT, PROMPT_BOX, PROMPT_FREEFORM = -1, 0, 1, 2


class Block(nn.Module):
    """Pre-norm attention with a residual: ``x + Attn(LN(x), LN(context))``."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                key_valid: torch.Tensor | None = None) -> torch.Tensor:
        q = self.norm_q(x)
        kv = q if context is None else self.norm_kv(context)
        return self.attn(q, kv, key_valid)


class HybridFusion(nn.Module):
    """Prompt embeddings ``(B, R, dim)`` + image tokens ``(B, N, dim)`` -> ``(B, R, dim)``."""

    def __init__(self, dim: int, heads: int, ffn_mult: int) -> None:
        super().__init__()
        self.image_self_attn = Block(dim, heads)
        self.ffn_norm = nn.LayerNorm(dim)
        self.ffn = MLP([dim, dim * ffn_mult, dim])
        self.cross_attn = Block(dim, heads)
        self.hybrid_self_attn = Block(dim, heads)
        self.out_norm = nn.LayerNorm(dim)

    def forward(self, prompts: torch.Tensor, image: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        v_sa = image + self.image_self_attn(image)
        e_ff = prompts + self.ffn(self.ffn_norm(prompts))
        h_ca = self.cross_attn(e_ff, v_sa)
        mixed = h_ca + e_ff
        hybrid = mixed + self.hybrid_self_attn(mixed, key_valid=valid)
        return self.out_norm(hybrid)


class PromptEncoder(nn.Module):
    """Visual prompts -> region tokens (one per prompt, spliced at ``<regionK>``).

    Inputs:
      ``image_tokens``  ``(B, N, llm_hidden)`` float32 (from ``vision_encoder``);
      ``prompt_boxes``  ``(B, R, 4)`` float32 XYXY normalised to 0-1 of the padded square;
                        points as ``[x, y, -1, -1]``; free-form as their tight box;
      ``prompt_types``  ``(B, R)`` int64, ``PROMPT_*``;
      ``prompt_masks``  ``(B, R, M, M)`` float32 0/1 rasters of free-form prompts in the
                        padded square (zeros for other types), ``M = mask_size``.
    Output: ``region_tokens`` ``(B, R, llm_hidden)`` float32; padding rows are zero.
    """

    def __init__(self, cfg: PromptConfig, llm_hidden: int) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.fourier = FourierEncoding(d)
        self.corner_embed = nn.Embedding(2, d)  # first / second corner
        self.no_corner_embed = nn.Embedding(1, d)  # a point's missing second corner
        self.type_embed = nn.Embedding(3, d)  # point, box, free-form
        self.sae = Dinov2Model(Dinov2Config(
            image_size=cfg.mask_size, patch_size=cfg.sae_patch, num_channels=1, hidden_size=cfg.sae_hidden,
            num_hidden_layers=cfg.sae_layers, num_attention_heads=cfg.sae_heads, mlp_ratio=4,
        ))
        self.sae_proj = nn.Linear(cfg.sae_hidden, d)
        self.image_in = nn.Linear(llm_hidden, d)
        self.fusion = HybridFusion(d, cfg.heads, cfg.ffn_mult)
        self.projector = MLP([d, llm_hidden, llm_hidden])

    def forward(self, image_tokens: torch.Tensor, prompt_boxes: torch.Tensor, prompt_types: torch.Tensor,
                prompt_masks: torch.Tensor) -> torch.Tensor:
        b, r = prompt_types.shape
        valid = prompt_types >= 0
        is_point = (prompt_types == PROMPT_POINT)[..., None]
        is_free = (prompt_types == PROMPT_FREEFORM)[..., None]
        first = self.fourier(prompt_boxes[..., 0:2]) + self.corner_embed.weight[0]
        second = self.fourier(prompt_boxes[..., 2:4].clamp(min=0.0)) + self.corner_embed.weight[1]
        second = torch.where(is_point, self.no_corner_embed.weight[0].expand_as(second), second)
        emb = first + second + self.type_embed(prompt_types.clamp(min=0))
        m = self.cfg.mask_size
        shape = self.sae(prompt_masks.reshape(b * r, 1, m, m)).pooler_output.reshape(b, r, -1)
        emb = emb + torch.where(is_free, self.sae_proj(shape), torch.zeros_like(emb))
        hybrid = self.fusion(emb, self.image_in(image_tokens), valid)
        return self.projector(hybrid) * valid[..., None].to(hybrid.dtype)
