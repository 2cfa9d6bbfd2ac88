"""Thin export adapters: rewrites that make a part traceable to ONNX, kept beside the
model (not inside it) and tested against the module they wrap."""
from __future__ import annotations

import copy

import torch
from torch import nn


def identity(module: nn.Module) -> nn.Module:
    """Parts that export as they are."""
    return module


class TraceableMaskDecoder(nn.Module):
    """``SamMaskDecoder.forward`` (single-mask output) without ``repeat_interleave``.

    onnxscript translates ``repeat_interleave`` with a dynamic count onto the wrong axis,
    so batch > 1 with queries > 1 fails in ONNX Runtime (DEPLOYMENT.md). Here each image's
    embedding is broadcast to its queries with ``expand`` + ``reshape`` instead: the same
    values in the same order. Shares the wrapped decoder's parameters."""

    def __init__(self, decoder: nn.Module) -> None:
        super().__init__()
        self.decoder = decoder

    def forward(self, image_embeddings: torch.Tensor, image_positional_embeddings: torch.Tensor,
                sparse_prompt_embeddings: torch.Tensor, dense_prompt_embeddings: torch.Tensor,
                multimask_output: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if multimask_output:
            raise ValueError("the exported pixel decoder returns one mask per query")
        d = self.decoder
        b, c, h, w = image_embeddings.shape
        q = sparse_prompt_embeddings.shape[1]
        output_tokens = torch.cat([d.iou_token.weight, d.mask_tokens.weight], dim=0)
        output_tokens = output_tokens[None, None].expand(b, q, -1, -1)
        tokens = torch.cat((output_tokens, sparse_prompt_embeddings), dim=2)
        image = (image_embeddings + dense_prompt_embeddings)[:, None].expand(b, q, c, h, w).reshape(b * q, c, h, w)
        image_pe = image_positional_embeddings[:, None].expand(b, q, c, h, w).reshape(b * q, c, h, w)
        point_embedding, image = d.transformer(point_embeddings=tokens, image_embeddings=image,
                                               image_positional_embeddings=image_pe, attention_similarity=None,
                                               target_embedding=None)
        iou_token_out = point_embedding[:, :, 0, :]
        mask_token_out = point_embedding[:, :, 1, :]
        image = image.transpose(2, 3).reshape(b * q, c, h, w)
        up = d.activation(d.upscale_layer_norm(d.upscale_conv1(image)))
        up = d.activation(d.upscale_conv2(up))
        hyper = d.output_hypernetworks_mlps[0](mask_token_out)[:, :, None]  # (B, Q, 1, C')
        _, c2, h2, w2 = up.shape
        masks = (hyper @ up.reshape(b, q, c2, h2 * w2)).reshape(b, q, 1, h2, w2)
        iou = d.iou_prediction_head(iou_token_out)[:, :, 0:1]
        return masks, iou


def pixel_decoder_adapter(module: nn.Module) -> nn.Module:
    """A shallow copy of the ``PixelDecoder`` whose mask decoder is traceable (shared weights)."""
    adapted = copy.copy(module)
    adapted._modules = dict(module._modules)
    adapted._modules["mask_decoder"] = TraceableMaskDecoder(module.mask_decoder)
    return adapted
