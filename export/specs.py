"""Declarative export specs, one per part, in one registry (``SPECS``).

A spec says what the exported graph looks like: input/output names (the part module's
``INPUT_NAMES``/``OUTPUT_NAMES``, declared there once), dtypes and named axes, which axes
are dynamic, the opset, the adapter that makes the part traceable, how to make example
inputs, and the parity tolerance per precision. Shape profiles
(min/opt/max, for TensorRT and for the manifest) derive from the spec and the
``ShapeLimits`` of a build. Part-specific tricks live in the part's spec, nowhere else.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from earthgptx import llm, pixel_decoder, prompt_encoder, vision_encoder
from earthgptx.config import ModelConfig
from earthgptx.llm import kv_names
from earthgptx.prompting import special_tokens

from .limits import ShapeLimits

OPSET = 18


@dataclass(frozen=True)
class TensorSpec:
    """``dims``: ints are fixed sizes, strings name dynamic axes."""

    name: str
    dtype: str
    dims: tuple[int | str, ...]


@dataclass(frozen=True)
class Comparison:
    """How one output is compared with its reference at some precisions: ``metric`` names a
    disagreement of ``export.metrics.PARITY_METRICS`` (``max_abs``, ``cosine``, ``box_iou``
    as ``1 - IoU``), ``tolerance`` the largest allowed per precision."""

    metric: str
    tolerance: dict[str, float]


@dataclass(frozen=True)
class ExportSpec:
    part: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    adapter: Callable[[nn.Module], nn.Module]
    example_sizes: dict[str, int] = field(default_factory=dict)  # every dynamic axis >= 2 when exporting
    tolerance: dict[str, float] = field(default_factory=dict)  # precision -> parity tolerance
    external_data: bool = False
    opset: int = OPSET
    int8_keep_fp32: tuple[str, ...] = ()  # module paths whose nodes INT8 leaves in FP32
    comparisons: dict[str, Comparison] = field(default_factory=dict)  # per output, where not the default

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def comparison(self, output: str, precision: str) -> tuple[str, float]:
        """``(metric, tolerance)`` for ``output`` at ``precision``: the output's declared
        comparison where it has one for that precision, else ``max_abs`` for FP32 and
        ``cosine`` for reduced precision with the part's ``tolerance``."""
        declared = self.comparisons.get(output)
        if declared is not None and precision in declared.tolerance:
            return declared.metric, declared.tolerance[precision]
        return ("max_abs" if precision == "fp32" else "cosine"), self.tolerance[precision]

    def example_inputs(self, sizes: dict[str, int] | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
        """Random inputs with the spec's shapes (axis sizes from ``sizes`` or ``example_sizes``)."""
        sizes = {**self.example_sizes, **(sizes or {})}
        gen = torch.Generator().manual_seed(seed)
        out = {}
        for t in self.inputs:
            shape = [d if isinstance(d, int) else sizes[d] for d in t.dims]
            if t.dtype == "float32":
                out[t.name] = torch.randn(*shape, generator=gen)
            else:
                out[t.name] = torch.zeros(*shape, dtype=torch.int64)
        return out

    def profile(self, limits: ShapeLimits, config: ModelConfig) -> dict[str, dict[str, list[int]]]:
        """Per input: ``{"min": shape, "opt": shape, "max": shape}``."""
        prof = {}
        for t in self.inputs:
            ranges = [(d, d, d) if isinstance(d, int) else limits.axis_range(d, config) for d in t.dims]
            prof[t.name] = {k: [r[i] for r in ranges] for i, k in enumerate(("min", "opt", "max"))}
        return prof


def _f(name: str, *dims: int | str) -> TensorSpec:
    return TensorSpec(name, "float32", dims)


def _i(name: str, *dims: int | str) -> TensorSpec:
    return TensorSpec(name, "int64", dims)


def vision_encoder_spec(config: ModelConfig) -> ExportSpec:
    from .adapters import identity

    v, h = config.vision, config.llm.hidden
    (pixels,), (tokens, embedding) = vision_encoder.INPUT_NAMES, vision_encoder.OUTPUT_NAMES
    return ExportSpec(
        "vision_encoder",
        inputs=(_f(pixels, "batch", 3, v.image_size, v.image_size),),
        outputs=(_f(tokens, "batch", v.num_tokens, h), _f(embedding, "batch", v.embed_dim, v.grid, v.grid)),
        adapter=identity, example_sizes={"batch": 2},
        tolerance={"fp32": 1e-3, "fp16": 2e-3, "int8": 2e-2},
        # the ViT stem sees raw pixels, the neck makes the dense embedding masks are cut from, and
        # the ConvNeXt in INT8 cost mask IoU (edge, held-out infrared: 0.978 with it, 0.991 without);
        # the from-scratch CNN ("cnn" kind): its stem and the FPN laterals that make the dense map
        int8_keep_fp32=("conv.stem", "conv.lateral", "neck") if v.kind == "cnn" else ("vit.embeddings", "cnn", "neck"),
    )


def prompt_encoder_spec(config: ModelConfig) -> ExportSpec:
    from .adapters import identity

    v, p, h = config.vision, config.prompt, config.llm.hidden
    (tokens, boxes, types, masks), (regions,) = prompt_encoder.INPUT_NAMES, prompt_encoder.OUTPUT_NAMES
    return ExportSpec(
        "prompt_encoder",
        inputs=(_f(tokens, "batch", v.num_tokens, h), _f(boxes, "batch", "regions", 4),
                _i(types, "batch", "regions"), _f(masks, "batch", "regions", p.mask_size, p.mask_size)),
        outputs=(_f(regions, "batch", "regions", h),),
        adapter=identity, example_sizes={"batch": 2, "regions": 3},
        tolerance={"fp32": 1e-3, "fp16": 2e-3, "int8": 2e-2},
    )


def llm_spec(config: ModelConfig) -> ExportSpec:
    from .adapters import identity

    c = config.llm
    vocab = c.vocab_size + len(special_tokens(config.prompt.max_regions))
    kv = lambda name, axis: _f(name, "batch", c.kv_heads, axis, c.head_dim)  # noqa: E731
    (embeds, attention, positions), (logits, hidden) = llm.INPUT_NAMES, llm.OUTPUT_NAMES
    return ExportSpec(
        "llm",
        inputs=(_f(embeds, "batch", "seq", c.hidden), _i(attention, "batch", "total"),
                _i(positions, "batch", "seq"), *(kv(n, "past") for n in kv_names(c.layers, "past_key_values"))),
        outputs=(_f(logits, "batch", vocab), _f(hidden, "batch", "seq", c.hidden),
                 *(kv(n, "total") for n in kv_names(c.layers, "present"))),
        adapter=identity, example_sizes={"batch": 2, "seq": 3, "past": 4, "total": 7},
        tolerance={"fp32": 2e-3, "fp16": 5e-3, "int8": 5e-2}, external_data=True,
    )


def pixel_decoder_spec(config: ModelConfig) -> ExportSpec:
    from .adapters import pixel_decoder_adapter

    v, h = config.vision, config.llm.hidden
    embedding, seg, valid, coords, labels = pixel_decoder.INPUT_NAMES
    masks, scores, boxes = pixel_decoder.OUTPUT_NAMES
    return ExportSpec(
        "pixel_decoder",
        inputs=(_f(embedding, "batch", v.embed_dim, v.grid, v.grid), _f(seg, "batch", "queries", h),
                _f(valid, "batch", "queries"), _f(coords, "batch", "queries", "points", 2),
                _i(labels, "batch", "queries", "points")),
        outputs=(_f(masks, "batch", "queries", v.image_size, v.image_size), _f(scores, "batch", "queries"),
                 _f(boxes, "batch", "queries", 4)),
        adapter=pixel_decoder_adapter, example_sizes={"batch": 2, "queries": 3, "points": 2},
        tolerance={"fp32": 1e-3, "fp16": 5e-3, "int8": 5e-2},
        # boxes are tight boxes of the mask (all zero for an empty one): cosine on them means
        # nothing (an empty against a non-empty box is not "distance 1.0 of a vector"), IoU does
        comparisons={"boxes": Comparison("box_iou", {"fp16": 0.1, "int8": 0.1})},
    )


SPECS: dict[str, Callable[[ModelConfig], ExportSpec]] = {
    "vision_encoder": vision_encoder_spec,
    "prompt_encoder": prompt_encoder_spec,
    "llm": llm_spec,
    "pixel_decoder": pixel_decoder_spec,
}
