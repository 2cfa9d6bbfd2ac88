"""``pixel_decoder``: the pixel perception module (LISA-style, SAM decoder).

The ``[SEG]`` token's last hidden state goes through an MLP into the decoder's prompt
space; together with optional point/box prompts (SAM encoding: random-Fourier position
+ label embedding) it queries ``transformers``' ``SamMaskDecoder`` (two-way
transformer) over the dense image embedding. Out come a mask, its predicted quality
and the mask's tight box, so segmentation and localisation come from one module.
A query without a ``[SEG]`` state (``seg_valid = 0``, e.g. a click on an encoded image)
uses a learned "no [SEG]" embedding in its place, as SAM uses "not a point".
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from transformers import SamMaskDecoderConfig
from transformers.models.sam.modeling_sam import SamMaskDecoder

from .config import PixelConfig, VisionConfig
from .layers import MLP, FourierEncoding

INPUT_NAMES = ("image_embedding", "seg_hidden", "seg_valid", "point_coords", "point_labels")
OUTPUT_NAMES = ("masks", "scores", "boxes")
LABEL_PAD, LABEL_BACKGROUND, LABEL_FOREGROUND, LABEL_BOX_TOP_LEFT, LABEL_BOX_BOTTOM_RIGHT = -1, 0, 1, 2, 3


class PixelDecoder(nn.Module):
    """Dense embedding + ``[SEG]`` states + optional points/boxes -> masks, scores, boxes.

    Inputs:
      ``image_embedding`` ``(B, C, G, G)`` float32 (from ``vision_encoder``);
      ``seg_hidden``      ``(B, Q, llm_hidden)`` float32: one ``[SEG]`` state per mask query;
      ``seg_valid``       ``(B, Q)`` float32, 1 where ``seg_hidden`` holds a real state;
      ``point_coords``    ``(B, Q, P, 2)`` float32 (x, y) continuous model-frame pixels
                          (``processing.Letterbox.points_to_model``); a box is two points;
      ``point_labels``    ``(B, Q, P)`` int64: ``LABEL_*`` (-1 padding, 0 background,
                          1 foreground, 2/3 box top-left/bottom-right).
    Outputs:
      ``masks``  ``(B, Q, S, S)`` float32 logits in the model frame (> 0 is the object);
      ``scores`` ``(B, Q)`` float32 predicted mask quality (IoU);
      ``boxes``  ``(B, Q, 4)`` float32 tight XYXY edges of ``masks > 0`` in model pixels,
                 all zero for an empty mask.
    """

    def __init__(self, cfg: PixelConfig, vision: VisionConfig, llm_hidden: int) -> None:
        super().__init__()
        d = vision.embed_dim
        self.image_size = vision.image_size
        self.grid = vision.grid
        self.seg_proj = MLP([llm_hidden, llm_hidden, d], act=nn.ReLU)
        self.no_seg_embed = nn.Embedding(1, d)
        self.fourier = FourierEncoding(d)
        self.point_embed = nn.Embedding(4, d)
        self.not_a_point_embed = nn.Embedding(1, d)
        self.no_mask_embed = nn.Embedding(1, d)
        self.mask_decoder = SamMaskDecoder(SamMaskDecoderConfig(
            hidden_size=d, num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, mlp_dim=cfg.mlp_dim,
            iou_head_hidden_dim=cfg.iou_head_hidden,
        ))

    def encode_points(self, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``(B, Q, P, 2)`` model pixels + ``(B, Q, P)`` labels -> ``(B, Q, P, C)``."""
        pe = self.fourier(coords / self.image_size)
        pad = (labels == LABEL_PAD)[..., None]
        pe = torch.where(pad, self.not_a_point_embed.weight[0].expand_as(pe), pe)
        label_emb = self.point_embed(labels.clamp(min=0))
        return pe + torch.where(pad, torch.zeros_like(label_emb), label_emb)

    def forward(self, image_embedding: torch.Tensor, seg_hidden: torch.Tensor, seg_valid: torch.Tensor,
                point_coords: torch.Tensor, point_labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        b, c, g, _ = image_embedding.shape
        q = seg_hidden.shape[1]
        w = seg_valid[..., None].to(seg_hidden.dtype)
        seg = self.seg_proj(seg_hidden) * w + self.no_seg_embed.weight[0] * (1.0 - w)  # (B, Q, C)
        sparse = torch.cat([seg[:, :, None], self.encode_points(point_coords, point_labels)], dim=2)
        dense = self.no_mask_embed.weight[0].reshape(1, c, 1, 1).expand(b, c, g, g)
        image_pe = self.fourier.grid(g, g)[None].expand(b, c, g, g)
        low_res, iou = self.mask_decoder(image_embedding, image_pe, sparse, dense, multimask_output=False)
        masks = F.interpolate(low_res.reshape(b * q, 1, low_res.shape[-2], low_res.shape[-1]),
                              size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        masks = masks.reshape(b, q, self.image_size, self.image_size)
        return masks, iou.reshape(b, q), tight_boxes(masks > 0)


def tight_boxes(fg: torch.Tensor) -> torch.Tensor:
    """``(B, Q, H, W)`` bool -> ``(B, Q, 4)`` float32 XYXY edges; zeros where empty."""
    h, w = fg.shape[-2:]
    rows = fg.any(dim=-1)  # (B, Q, H)
    cols = fg.any(dim=-2)  # (B, Q, W)
    ys = torch.arange(h, device=fg.device, dtype=torch.float32)
    xs = torch.arange(w, device=fg.device, dtype=torch.float32)
    big = float(max(h, w) + 1)
    y0 = torch.where(rows, ys, big).amin(dim=-1)
    y1 = torch.where(rows, ys + 1, -1.0).amax(dim=-1)
    x0 = torch.where(cols, xs, big).amin(dim=-1)
    x1 = torch.where(cols, xs + 1, -1.0).amax(dim=-1)
    boxes = torch.stack([x0, y0, x1, y1], dim=-1)
    return boxes * rows.any(dim=-1, keepdim=True).to(boxes.dtype)
