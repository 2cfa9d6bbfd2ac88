"""Symmetric INT8 Q/DQ graphs made fast on ONNX Runtime's CPU kernels.

The INT8 ONNX of a build has symmetric int8 activations (zero point 0): what TensorRT
requires. ONNX Runtime's CPU execution provider fuses ``DQ -> MatMul -> Q`` into an integer
``QLinearMatMul`` only for uint8 activations; with int8 activations it runs the Q/DQ nodes
literally around a float MatMul, slower than FP32 (measured on this project's ViT blocks).

Rewriting an int8 activation's zero point ``z`` as the uint8 zero point ``z + 128`` is
lossless: ``clamp(round(x / s) + z, -128, 127) + 128 == clamp(round(x / s) + z + 128, 0, 255)``
and ``(q + 128) - (z + 128) == q - z``. So the runner applies it in memory when it opens the
file for the CPU; the file on disk stays the one TensorRT consumes. Weights (a DQ whose
input is an initializer) keep int8. On x86 CPUs without VNNI, ONNX Runtime's u8 x s8 kernels
may saturate intermediate sums (its documentation suggests ``reduce_range`` there); the
builds here were measured on an AVX512-VNNI CPU.
"""
from __future__ import annotations

import numpy as np

Q_OPS = ("QuantizeLinear", "DequantizeLinear")


def _activation_zero_points(model) -> list[tuple[object, str]]:
    """(node, zero-point initializer name) of every activation Q/DQ with an int8 zero point."""
    from onnx import TensorProto

    inits = {i.name: i for i in model.graph.initializer}
    found = []
    for node in model.graph.node:
        if node.op_type not in Q_OPS or len(node.input) < 3:
            continue
        if node.op_type == "DequantizeLinear" and node.input[0] in inits:
            continue  # a weight
        zp = inits.get(node.input[2])
        if zp is not None and zp.data_type == TensorProto.INT8:
            found.append((node, zp.name))
    return found


def has_int8_activations(model) -> bool:
    """True if ``model`` (loaded with or without external data) has int8 activation Q/DQ."""
    return bool(_activation_zero_points(model))


def to_unsigned_activations(model) -> int:
    """Rewrite ``model``'s int8 activation zero points as uint8 (+128), in place. Returns the
    number of Q/DQ nodes changed. Weights are untouched."""
    from onnx import TensorProto, numpy_helper

    pairs = _activation_zero_points(model)
    inits = {i.name: i for i in model.graph.initializer}
    renamed: dict[str, str] = {}
    for _, name in pairs:
        if name in renamed:
            continue
        values = numpy_helper.to_array(inits[name]).astype(np.int16) + 128
        new = f"{name}_as_uint8"
        model.graph.initializer.append(numpy_helper.from_array(values.astype(np.uint8), new))
        renamed[name] = new
    quantized_outputs = set()
    for node, name in pairs:
        node.input[2] = renamed[name]
        if node.op_type == "QuantizeLinear":
            quantized_outputs.add(node.output[0])
    for info in list(model.graph.value_info) + list(model.graph.output):
        if info.name in quantized_outputs and info.type.tensor_type.elem_type == TensorProto.INT8:
            info.type.tensor_type.elem_type = TensorProto.UINT8
    used = {i for n in model.graph.node for i in n.input}
    for name in renamed:  # drop int8 zero points no node uses any more (weights may still)
        if name not in used:
            model.graph.initializer.remove(inits[name])
    return len(pairs)
