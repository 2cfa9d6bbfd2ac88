"""``vision_encoder``: mixed visual encoders (MVE), or a from-scratch CNN.

A DINOv2-style ViT and a ConvNeXt-style CNN (``transformers``' ``Dinov2Model`` and
``ConvNextModel``, so real checkpoints load by name) encode the same image. The CNN's
last stage is resized to the ViT patch grid and the two are concatenated channel-wise:
* pooled to ``token_grid x token_grid`` and projected to the LLM width -> image tokens;
* through a SAM-style neck -> the dense image embedding the pixel decoder reads.

``kind="cnn"`` (the trained default) replaces both towers by ``ConvEncoder``: a residual
CNN (learns from a few thousand images, where a ViT would not; batch norm in the ``small``
preset, see ``_norm``) and a
feature pyramid whose stride-8 output is the dense embedding, so that infrared targets of
a few pixels keep their own cells; the stride-16 and -32 maps are pooled into the tokens.
``kind="effnet"`` is ``ConvEncoder`` with EfficientNet-Lite0 (``effnet_lite``) as its stages,
which ``egx train`` starts from ImageNet weights. Same inputs and outputs either way.

Class words (``VisionConfig.class_names``, the trained default): a linear classifier on the
mean grid token gives probabilities over the training data's classes; ``class_words`` holds
each class name's LLM word embeddings (``(C, class_tokens, llm_hidden)``, zero-padded after
the name's tokens; a buffer that ``model.build_model`` fills through ``set_class_words``),
and their mixture by those probabilities follows the grid tokens. A confident classifier thus puts the class's
name in front of the LLM as words it already reads: answering "what is this?" becomes
copying, which a pretrained LLM does with little training, where mapping learned image
features to a name needs many classification questions (EVALUATION.md, run 4: a class head on
the same tokens was right far more often than the LLM's answer). The mixture is soft and
differentiable: the text loss trains the classifier too.
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


def _norm(c: int, kind: str) -> nn.Module:
    """``VisionConfig.norm``. ``"group"``: no batch statistics (the first trained defaults).
    ``"batch"``: measured on MSTAR alone (one core, 128 px, same recipe otherwise), batch norm
    reached 99 % validation accuracy in 4 minutes where group norm stood near 50 % after 10
    (EVALUATION.md, run 6). Its running statistics are those of the training batches, which
    mix optical, SAR and infrared images as inference sees them one by one; ``egx train``
    re-estimates them at the end on un-augmented images (``training.batchnorm``), because the
    crops of augmented items are resampled and their speckle smoothed. Exported to ONNX, batch
    norm folds into the convolutions."""
    return nn.BatchNorm2d(c) if kind == "batch" else nn.GroupNorm(min(8, c // 4), c)


class ResBlock(nn.Module):
    """``x + N(conv(ReLU(N(conv(x)))))``, then ReLU, ``N`` the ``norm`` kind; ``(B, C, H, W)`` in and out."""

    def __init__(self, c: int, norm: str = "group") -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), _norm(c, norm), nn.ReLU(inplace=True),
                                  nn.Conv2d(c, c, 3, padding=1, bias=False), _norm(c, norm))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.body(x))


def _down(cin: int, cout: int, norm: str) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), _norm(cout, norm),
                         nn.ReLU(inplace=True))


class ConvEncoder(nn.Module):
    """``(B, 3, S, S)`` -> ``(fused (B, C3 + C4, T, T), dense (B, embed_dim, S/8, S/8))``.

    Stages at strides 4, 8, 16, 32 (``cnn_dims``, ``cnn_depths`` residual blocks each); an
    FPN (1x1 laterals, top-down upsample-and-add) gives the stride-8 dense map; the
    stride-16 and stride-32 maps are average-pooled to the ``token_grid`` and concatenated.

    With ``cfg.kind == "effnet"`` the stages are ``effnet_lite.EffNetLite0`` (``backbone``).
    """

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        if cfg.kind == "effnet":
            from .effnet_lite import DIMS, EffNetLite0

            self.backbone = EffNetLite0()
            d = (None, *DIMS)
        else:
            d = cfg.cnn_dims
            nm = cfg.norm
            self.stem = nn.Sequential(_down(3, d[0] // 2, nm), _down(d[0] // 2, d[0], nm))  # stride 4
            self.stages = nn.ModuleList()
            for i, (c, n) in enumerate(zip(d, cfg.cnn_depths)):
                down = [] if i == 0 else [_down(d[i - 1], c, nm)]
                self.stages.append(nn.Sequential(*down, *(ResBlock(c, nm) for _ in range(n))))
        e = cfg.embed_dim
        self.lateral = nn.ModuleList(nn.Conv2d(c, e, 1) for c in d[1:])
        self.out_dim = d[2] + d[3]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cfg.kind == "effnet":
            c2, c3, c4 = self.backbone(x)
        else:
            feats = []
            x = self.stem(x)
            for stage in self.stages:
                x = stage(x)
                feats.append(x)
            c2, c3, c4 = feats[1], feats[2], feats[3]  # strides 8, 16, 32
        top = self.lateral[2](c4)
        mid = self.lateral[1](c3) + F.interpolate(top, size=c3.shape[-2:], mode="nearest")
        dense = self.lateral[0](c2) + F.interpolate(mid, size=c2.shape[-2:], mode="nearest")
        t = self.cfg.token_grid
        k3, k4 = c3.shape[-1] // t, c4.shape[-1] // t
        fused = torch.cat([F.avg_pool2d(c3, k3, k3), F.avg_pool2d(c4, k4, k4)], dim=1)
        return fused, dense


class VisionEncoder(nn.Module):
    """image -> image tokens + dense image embedding.

    Inputs:  ``pixel_values`` ``(B, 3, S, S)`` float32, RGB normalised by
             ``processing.PIXEL_MEAN/STD``, padded square (model frame).
    Outputs: ``image_tokens`` ``(B, num_tokens, llm_hidden)`` float32: the token grid
             row-major, then (with ``class_names``) the ``class_tokens`` class words;
             ``image_embedding`` ``(B, embed_dim, G, G)`` float32 with
             ``G = S // patch_size``, cell (i, j) covering model pixels
             ``[j*S/G, (j+1)*S/G) x [i*S/G, (i+1)*S/G)``.
    """

    def __init__(self, cfg: VisionConfig, llm_hidden: int) -> None:
        super().__init__()
        self.cfg = cfg
        if cfg.class_names:
            self.classifier = nn.Linear(llm_hidden, len(cfg.class_names))
            self.register_buffer("class_words", torch.zeros(len(cfg.class_names), cfg.class_tokens, llm_hidden))
        if cfg.pyramid:
            self.conv = ConvEncoder(cfg)
            self.projector = MLP([self.conv.out_dim, llm_hidden, llm_hidden])
            self.neck = nn.Sequential(nn.Conv2d(cfg.embed_dim, cfg.embed_dim, 3, padding=1, bias=False),
                                      LayerNorm2d(cfg.embed_dim))
            return
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
        image_tokens, image_embedding, _ = self.encode(pixel_values)
        return image_tokens, image_embedding

    def encode(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``forward``'s outputs and the classifier's logits ``(B, C)`` (``None`` without classes)."""
        grid, image_embedding = self._grid(pixel_values)
        if not self.cfg.class_names:
            return grid, image_embedding, None
        logits = self.classifier(grid.mean(1))
        words = (logits.softmax(-1).to(self.class_words.dtype) @ self.class_words.flatten(1)).view(
            -1, *self.class_words.shape[1:])
        return torch.cat([grid, words.to(grid.dtype)], dim=1), image_embedding, logits

    def _grid(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Grid tokens ``(B, token_grid**2, llm_hidden)`` and the dense embedding."""
        if self.cfg.pyramid:
            pooled, dense = self.conv(pixel_values)
            return self.projector(pooled.flatten(2).transpose(1, 2)), self.neck(dense)
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


def set_class_words(encoder: VisionEncoder, embed_table: torch.Tensor, tokenizer) -> None:
    """Fill ``encoder.class_words`` with each class name's word embeddings from the LLM's
    ``embed_table`` ``(vocab, llm_hidden)``: the name's tokens as an answer starts them, the
    first ``class_tokens`` of them, zero rows after."""
    cfg = encoder.cfg
    with torch.no_grad():
        encoder.class_words.zero_()
        for i, name in enumerate(cfg.class_names):
            ids = tokenizer(name, add_special_tokens=False).input_ids[: cfg.class_tokens]
            encoder.class_words[i, : len(ids)] = embed_table[torch.tensor(ids)].to(encoder.class_words.dtype)
