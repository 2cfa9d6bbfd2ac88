"""Symmetric INT8 Q/DQ graphs made fast on ONNX Runtime's CPU kernels.

The INT8 ONNX of a build has symmetric int8 activations (zero point 0): what TensorRT
requires. ONNX Runtime's CPU execution provider fuses ``DQ -> MatMul -> Q`` into an integer
``QLinearMatMul`` only for uint8 activations; with int8 activations it runs the Q/DQ nodes
literally around a float MatMul, slower than FP32 (measured on this project's ViT blocks).

Rewriting an int8 activation's zero point ``z`` as the uint8 zero point ``z + 128`` is
lossless: ``clamp(round(x / s) + z, -128, 127) + 128 == clamp(round(x / s) + z + 128, 0, 255)``
and ``(q + 128) - (z + 128) == q - z``. So the runner applies it in memory when it opens the
file for the CPU; the file on disk stays the one TensorRT consumes.

Weights (a DQ whose input is an initializer, ``MatMulInteger``'s constant B) keep int8 where
the CPU multiplies u8 x s8 exactly (VNNI, AMX, ARM). On x86 CPUs without VNNI those kernels
saturate (``runners.cpu``), so ``prepare_for_cpu`` there also rewrites the weights as uint8
with their zero points + 128, by the same identity: lossless, and u8 x u8 kernels do not
saturate.
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


def _zero_point_u8(model, name: str | None, like: str | None, weight: str, inits: dict, made: dict) -> str:
    """The uint8 (+128) version of int8 zero point ``name`` (created once), or, when the node
    has none (int8 zero point 0), 128 in the shape of the scale ``like`` (a scalar without one)."""
    from onnx import numpy_helper

    key = name or f"<none:{like or weight}>"
    if key not in made:
        if name:
            values = numpy_helper.to_array(inits[name]).astype(np.int16) + 128
        else:
            shape = numpy_helper.to_array(inits[like]).shape if like else ()
            values = np.full(shape, 128, np.int16)
        new = f"{name or like or weight}_u8w"
        model.graph.initializer.append(numpy_helper.from_array(values.astype(np.uint8), new))
        made[key] = new
    return made[key]


def to_unsigned_weights(model) -> int:
    """Rewrite in place every int8 weight initializer, and its zero point, as uint8 (+128): the
    input of a ``DequantizeLinear`` (Q/DQ graphs) or input B of a ``MatMulInteger`` (the LLM's
    dynamic form). Returns the number of weights rewritten. Same integers after the zero point
    is taken off, so the same results; run where ``runners.cpu.u8s8_saturates``."""
    from onnx import TensorProto, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    converted: set[str] = set()
    made: dict[str, str] = {}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear":
            w, zp_slot, scale = node.input[0], 2, node.input[1]
        elif node.op_type == "MatMulInteger" and len(node.input) > 1:
            w, zp_slot, scale = node.input[1], 3, None
        else:
            continue
        if w not in inits or inits[w].data_type != TensorProto.INT8:
            continue
        zp = node.input[zp_slot] if len(node.input) > zp_slot and node.input[zp_slot] else None
        new_zp = _zero_point_u8(model, zp, scale, w, inits, made)
        while len(node.input) <= zp_slot:
            node.input.append("")
        node.input[zp_slot] = new_zp
        if w not in converted:
            values = numpy_helper.to_array(inits[w]).astype(np.int16) + 128
            inits[w].CopyFrom(numpy_helper.from_array(values.astype(np.uint8), w))
            converted.add(w)
    used = {i for n in model.graph.node for i in n.input}
    for name in [n for n in inits if n not in used and inits[n].data_type == TensorProto.INT8]:
        model.graph.initializer.remove(inits[name])  # int8 zero points nothing reads any more
    return len(converted)


def has_int8_weights(model) -> bool:
    """True if ``model`` (loaded with or without external data) has int8 weights that
    ``to_unsigned_weights`` would rewrite."""
    from onnx import TensorProto

    int8 = {i.name for i in model.graph.initializer if i.data_type == TensorProto.INT8}
    return any((n.op_type == "DequantizeLinear" and n.input[0] in int8)
               or (n.op_type == "MatMulInteger" and len(n.input) > 1 and n.input[1] in int8)
               for n in model.graph.node)


def prepare_for_cpu(model, saturates: bool) -> dict[str, int]:
    """What the CPU runner does to an INT8 model before ONNX Runtime opens it, in place:
    uint8 activations always, uint8 weights where the CPU's u8 x s8 kernels ``saturates``.
    Returns ``{"unsigned_activations", "unsigned_weights"}`` (counts)."""
    return {"unsigned_activations": to_unsigned_activations(model),
            "unsigned_weights": to_unsigned_weights(model) if saturates else 0}
