"""Low-rank adapters (LoRA, Hu et al. 2021) on the LLM's linear layers.

Training wraps each chosen ``nn.Linear`` of the LLM in ``LoRALinear``: ``y = W x + B A x``
with ``A`` ``(r, in)`` (random) and ``B`` ``(out, r)`` (zero at the start, so training starts
from the base model exactly) and ``W`` frozen. A checkpoint stores only the products' factors
(``llm.lora.<module>.a`` / ``.b``, the scale folded into ``b``: a few MB), and loading folds
them back into the base weights (``W += B A``), so inference, export and engines see a plain
Llama with no adapter at all.
"""
from __future__ import annotations

import math

import torch
from torch import nn

PREFIX = "llm.lora."
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    """``base(x) + scale * (x @ lora_a.T) @ lora_b.T``; ``base`` frozen."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.base = base
        base.requires_grad_(False)
        self.scale = alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.t().to(x.dtype)) @ (self.lora_b.t() * self.scale).to(x.dtype)


def add_lora(llm: nn.Module, rank: int, alpha: float, targets: tuple[str, ...] = TARGETS) -> list[nn.Parameter]:
    """Wrap every ``nn.Linear`` of ``llm`` whose attribute name is in ``targets``; returns the
    new trainable parameters."""
    params: list[nn.Parameter] = []
    for module in list(llm.modules()):
        for name, child in list(module.named_children()):
            if name in targets and isinstance(child, nn.Linear):
                wrapped = LoRALinear(child, rank, alpha)
                setattr(module, name, wrapped)
                params += [wrapped.lora_a, wrapped.lora_b]
    if not params:
        raise ValueError(f"no linear layer named {targets} in the LLM")
    return params


def lora_factors(llm: nn.Module) -> dict[str, torch.Tensor]:
    """``{f"{PREFIX}{path}.a": (r, in), f"{PREFIX}{path}.b": (out, r)}`` with the scale in ``b``;
    ``path`` is the wrapped linear's path inside ``llm`` (the plain model's path too)."""
    out: dict[str, torch.Tensor] = {}
    for path, m in llm.named_modules():
        if isinstance(m, LoRALinear):
            out[f"{PREFIX}{path}.a"] = m.lora_a.detach().float().contiguous()
            out[f"{PREFIX}{path}.b"] = (m.lora_b.detach().float() * m.scale).contiguous()
    return out


def merge_factors(llm: nn.Module, factors: dict[str, torch.Tensor]) -> int:
    """Fold ``W += b @ a`` into the plain linears of ``llm``; returns how many. Raises
    ``KeyError`` naming a path that is not a linear of ``llm`` or a factor without its pair."""
    modules = dict(llm.named_modules())
    paths = sorted({k[len(PREFIX):].rsplit(".", 1)[0] for k in factors})
    with torch.no_grad():
        for path in paths:
            a, b = factors.get(f"{PREFIX}{path}.a"), factors.get(f"{PREFIX}{path}.b")
            target = modules.get(path)
            if a is None or b is None or not isinstance(target, nn.Linear) \
                    or tuple(target.weight.shape) != (b.shape[0], a.shape[1]):
                raise KeyError(f"LoRA factors for {path!r} do not fit the LLM")
            target.weight += (b.to(torch.float64) @ a.to(torch.float64)).to(target.weight.dtype)
    return len(paths)


def merge_lora(llm: nn.Module) -> int:
    """Fold every ``LoRALinear`` of ``llm`` into its base linear and put the plain linear back
    in its place (in place; returns how many): the LLM is then an ordinary Llama again."""
    n = 0
    for module in list(llm.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                with torch.no_grad():
                    delta = (child.lora_b.double() * child.scale) @ child.lora_a.double()
                    child.base.weight += delta.to(child.base.weight.dtype)
                setattr(module, name, child.base)
                n += 1
    return n
