"""``vision_encoder``: mixed visual encoders (MVE).

A DINOv2-style ViT and a ConvNeXt-style CNN (``transformers``' ``Dinov2Model`` and
``ConvNextModel``, so real checkpoints load by name) encode the same image. The CNN's
last stage is resized to the ViT patch grid and the two are concatenated channel-wise:
* pooled to ``token_grid x token_grid`` and projected to the LLM width -> image tokens;
* through a SAM-style neck -> the dense image embedding the pixel decoder reads.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from transformers import ConvNextConfig, ConvNextModel, Dinov2Config, Dinov2Model

from .config import VisionConfig
from .layers import MLP, LayerNorm2d

INPUT_NAMES = ("pixel_values",)
OUTPUT_NAMES = ("image_tokens", "image_embedding")


def build_vit(cfg: VisionConfig) -> Dinov2Model:
    if cfg.vit_pretrained:
        return Dinov2Model.from_pretrained(cfg.vit_pretrained, local_files_only=True)
    return Dinov2Model(Dinov2Config(
        image_size=cfg.image_size, patch_size=cfg.patch_size, hidden_size=cfg.vit_hidden,
        num_hidden_layers=cfg.vit_layers, num_attention_heads=cfg.vit_heads, mlp_ratio=cfg.vit_mlp_ratio,
    ))


def build_cnn(cfg: VisionConfig) -> ConvNextModel:
    if cfg.cnn_pretrained:
        return ConvNextModel.from_pretrained(cfg.cnn_pretrained, local_files_only=True)
    return ConvNextModel(ConvNextConfig(
        depths=list(cfg.cnn_depths), hidden_sizes=list(cfg.cnn_dims), image_size=cfg.image_size,
    ))


class VisionEncoder(nn.Module):
    """image -> image tokens + dense image embedding.

    Inputs:  ``pixel_values`` ``(B, 3, S, S)`` float32, RGB normalised by
             ``processing.PIXEL_MEAN/STD``, padded square (model frame).
    Outputs: ``image_tokens`` ``(B, token_grid**2, llm_hidden)`` float32, row-major over the
             token grid; ``image_embedding`` ``(B, embed_dim, G, G)`` float32 with
             ``G = S // patch_size``, cell (i, j) covering model pixels
             ``[j*S/G, (j+1)*S/G) x [i*S/G, (i+1)*S/G)``.
    """

    def __init__(self, cfg: VisionConfig, llm_hidden: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.vit = build_vit(cfg)
        self.cnn = build_cnn(cfg)
        vit_dim = self.vit.config.hidden_size
        cnn_dim = self.cnn.config.hidden_sizes[-1]
        fused = vit_dim + cnn_dim
        self.projector = MLP([fused, llm_hidden, llm_hidden])
        self.neck = nn.Sequential(
            nn.Conv2d(fused, cfg.embed_dim, 1, bias=False), LayerNorm2d(cfg.embed_dim),
            nn.Conv2d(cfg.embed_dim, cfg.embed_dim, 3, padding=1, bias=False), LayerNorm2d(cfg.embed_dim),
        )
        self.num_prefix = 1 + getattr(self.vit.config, "num_register_tokens", 0)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, g = pixel_values.shape[0], self.cfg.grid
        vit = self.vit(pixel_values).last_hidden_state[:, self.num_prefix:]  # (B, G*G, Cv)
        vit = vit.transpose(1, 2).reshape(b, -1, g, g)
        cnn = self.cnn(pixel_values).last_hidden_state  # (B, Cc, S/32, S/32)
        cnn = F.interpolate(cnn, size=(g, g), mode="bilinear", align_corners=False)
        fused = torch.cat([vit, cnn], dim=1)  # (B, Cv + Cc, G, G)
        image_embedding = self.neck(fused)
        k = g // self.cfg.token_grid
        pooled = F.avg_pool2d(fused, kernel_size=k, stride=k)  # (B, C, T, T)
        image_tokens = self.projector(pooled.flatten(2).transpose(1, 2))
        return image_tokens, image_embedding
