"""Small building blocks shared by the parts: random-Fourier positional encoding
(SAM-style), multi-head attention with an explicit q.k^T / softmax / attn.v (so that
exporters can find and keep those activation x activation matmuls in FP32), an MLP
and a channel LayerNorm for ``(B, C, H, W)`` maps."""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


class FourierEncoding(nn.Module):
    """Random-Fourier features of 2-D coordinates normalised to [0, 1].

    ``forward(coords)``: ``(..., 2)`` float (x, y) in [0, 1] -> ``(..., dim)``.
    ``grid(h, w)``: the encoding of every cell centre of an ``h x w`` grid, ``(dim, h, w)``.
    """

    def __init__(self, dim: int, scale: float = 1.0) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"FourierEncoding needs an even dim, got {dim}")
        self.register_buffer("gaussian", scale * torch.randn(2, dim // 2))

    def forward(self, coords: torch.Tensor) -> torch.Tensor:
        proj = (2.0 * coords - 1.0) @ self.gaussian * (2.0 * math.pi)
        return torch.cat([torch.sin(proj), torch.cos(proj)], dim=-1)

    def grid(self, h: int, w: int) -> torch.Tensor:
        ys = (torch.arange(h, dtype=torch.float32, device=self.gaussian.device) + 0.5) / h
        xs = (torch.arange(w, dtype=torch.float32, device=self.gaussian.device) + 0.5) / w
        coords = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)  # (h, w, 2) as (x, y)
        return self(coords).permute(2, 0, 1)


class Attention(nn.Module):
    """Multi-head attention. ``query`` ``(B, Lq, D)``, ``context`` ``(B, Lk, D)``,
    ``key_valid`` optional ``(B, Lk)`` bool (False = padding, ignored)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.o_proj = nn.Linear(dim, dim)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        return x.reshape(b, n, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, query: torch.Tensor, context: torch.Tensor,
                key_valid: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self._split(self.q_proj(query)), self._split(self.k_proj(context)), self._split(self.v_proj(context))
        scores = torch.matmul(q, k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
        if key_valid is not None:
            scores = scores + (~key_valid)[:, None, None, :].to(scores.dtype) * -1e9
        attn = torch.softmax(scores, dim=-1)
        out = torch.matmul(attn, v).transpose(1, 2).flatten(2)
        return self.o_proj(out)


class MLP(nn.Module):
    def __init__(self, dims: list[int], act: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(dims) - 2:
                layers.append(act())
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of a ``(B, C, H, W)`` map."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], self.weight, self.bias, self.eps).permute(0, 3, 1, 2)
