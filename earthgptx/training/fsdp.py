"""Fully sharded data parallel (FSDP2, ``torch.distributed.fsdp.fully_shard``) for models
that do not fit one device whole: ``egx train --fsdp`` under ``torchrun``.

Units: every decoder layer of the LLM is its own unit (its parameters are gathered for its
forward and backward only), and everything else (the vision encoder, prompt encoder, pixel
decoder, LLM embeddings and final norm, the added rows, the training-only heads) is the root
unit. FSDP gathers and reduces a unit's tensors in collectives every rank must call in the
same order, so ``TrainModule.fused_prefix`` makes each rank call the LLM exactly once a step
(the system prefix runs inside that call instead of from a cached KV; a rank without text
rows runs the prefix alone) and ties every root parameter into the loss with weight zero.
Gradients are averaged over ranks, as with DDP: the loss is scaled the same way, and the
result equals one process at the same global batch (tested with 2 CPU processes, gloo).

State: ``state.pt`` and the final checkpoint hold full (unsharded) tensors of the trainable
parameters, gathered on every rank and written by rank 0, so a run resumes on any world size
and its checkpoint is the same as an unsharded run's.
"""
from __future__ import annotations

import torch

from .step import LLM_LAYERS, TrainModule


def shard(module: TrainModule, device: torch.device, world: int) -> None:
    """Apply ``fully_shard`` in place: each LLM decoder layer, then the root. Build the
    optimizer after this (parameters become ``DTensor`` shards)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world,))
    layers = module.model.llm.model.model.layers
    if not any(n.startswith(LLM_LAYERS) for n, _ in module.named_parameters()):
        raise RuntimeError(f"the LLM's decoder layers are not at {LLM_LAYERS!r}")
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(module, mesh=mesh)
    module.fused_prefix = True
    module.lora = [p for n, p in module.named_parameters() if ".lora_" in n]


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True, **kw)


def full_state(module: TrainModule, opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    """``(trainable tensors, optimizer state)`` unsharded; a collective: call on every rank."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return get_model_state_dict(module, options=_options()), get_optimizer_state_dict(module, opt, options=_options())


def load_full_state(module: TrainModule, opt: torch.optim.Optimizer, model_state: dict, opt_state: dict) -> None:
    """Shard a ``full_state`` back into ``module`` and ``opt`` (every rank holds the full dicts)."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    set_model_state_dict(module, model_state, options=_options(strict=False))
    set_optimizer_state_dict(module, opt, opt_state, options=_options())
