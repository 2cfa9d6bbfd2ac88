"""PyTorch part -> ONNX file, through ``torch.onnx.export(dynamo=True)``, then checked
with ``onnx.checker`` and shape inference. Dynamic axes carry the spec's names."""
from __future__ import annotations

import logging
from contextlib import contextmanager
import warnings
from pathlib import Path

import torch
from torch import nn

from .specs import ExportSpec

log = logging.getLogger(__name__)


@contextmanager
def eager_attention(module: nn.Module):
    """Export ``transformers`` attention as plain matmul/softmax. Their SDPA path exports
    with NaN guards (``IsNaN`` + ``Where`` on every attention map) that cost a quarter of
    the vision encoder's time in ONNX Runtime; the math is the same."""
    configs = {}
    for m in module.modules():
        c = getattr(m, "config", None)
        if c is not None and hasattr(c, "_attn_implementation"):
            configs[id(c)] = c
    saved = {k: c._attn_implementation for k, c in configs.items()}
    for c in configs.values():
        c._attn_implementation = "eager"
    try:
        yield
    finally:
        for k, c in configs.items():
            c._attn_implementation = saved[k]


def export_onnx(spec: ExportSpec, module: nn.Module, path: str | Path) -> Path:
    """Export ``module`` (wrapped by the spec's adapter) to ``path``; returns the path."""
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    adapter = spec.adapter(module).eval()
    example = spec.example_inputs()
    args = tuple(example[n] for n in spec.input_names)
    dims: dict[str, object] = {}
    dynamic = []
    for t in spec.inputs:
        axes = {}
        for i, d in enumerate(t.dims):
            if isinstance(d, str):
                axes[i] = torch.export.Dim.AUTO if d == "total" else dims.setdefault(d, torch.export.Dim(d))
        dynamic.append(axes)
    shapes = _group_varargs(adapter, tuple(dynamic))
    with torch.no_grad(), warnings.catch_warnings(), eager_attention(adapter), _no_torchvision_notes():
        warnings.simplefilter("ignore")  # the exporter's notes on axis names and deprecations
        program = torch.onnx.export(
            adapter, args, dynamo=True, input_names=spec.input_names, output_names=spec.output_names,
            dynamic_shapes=shapes, opset_version=spec.opset, optimize=True, verbose=False,
        )
    model = program.model_proto
    _name_axes(model, spec)
    for p in [path, path.with_name(path.name + ".data")]:
        p.unlink(missing_ok=True)
    if spec.external_data:
        onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(model, path)
    onnx.checker.check_model(str(path), full_check=False)
    onnx.shape_inference.infer_shapes_path(str(path), check_type=True, strict_mode=False)
    return path


@contextmanager
def _no_torchvision_notes():
    """The exporter logs "torchvision is not installed. Skipping torchvision::nms" (and three
    more) at every export: no part uses torchvision ops, so those lines only alarm users."""
    registry = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registry.level
    registry.setLevel(logging.ERROR)
    try:
        yield
    finally:
        registry.setLevel(level)


def _group_varargs(module: nn.Module, dynamic: tuple) -> tuple:
    """``torch.export`` wants the specs of a ``*args`` parameter as one nested tuple."""
    import inspect

    params = list(inspect.signature(module.forward).parameters.values())
    for i, p in enumerate(params):
        if p.kind is inspect.Parameter.VAR_POSITIONAL:
            return (*dynamic[:i], tuple(dynamic[i:]))
    return dynamic


def _name_axes(model, spec: ExportSpec) -> None:
    """Give graph inputs/outputs the spec's axis names (dynamo writes s0, s1, ...)."""
    for values, tensors in ((model.graph.input, spec.inputs), (model.graph.output, spec.outputs)):
        by_name = {t.name: t for t in tensors}
        for v in values:
            t = by_name.get(v.name)
            if t is None:
                raise ValueError(f"{spec.part}: exported graph has unexpected tensor {v.name!r}")
            shape = v.type.tensor_type.shape
            if len(shape.dim) != len(t.dims):
                raise ValueError(f"{spec.part}: {v.name} has rank {len(shape.dim)}, spec says {len(t.dims)}")
            for dim, want in zip(shape.dim, t.dims):
                if isinstance(want, str):
                    dim.ClearField("dim_value")
                    dim.dim_param = want
