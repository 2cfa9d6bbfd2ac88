"""FP16 ONNX for strongly typed TensorRT builds (TensorRT 11 has no FP16 builder flag:
precision lives in the graph). The cast keeps in FP32 what breaks vision transformers in
FP16 (efficientvit#113/#142): normalisations (LayerNorm, and the ReduceMean/Pow/Sqrt/Div
of decomposed RMS/LayerNorms), softmax, activation x activation matmuls (q.k^T, attn.v)
and activation + activation adds (residuals). Inputs and outputs stay FP32.
It uses onnxconverter-common's block-list converter (an equivalent of ModelOpt AutoCast
that installs on any machine)."""
from __future__ import annotations

from pathlib import Path

KEEP_FP32_OPS = ("LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization", "Softmax", "ReduceMean",
                 "Pow", "Sqrt", "Reciprocal", "Div", "Exp", "Log", "CumSum", "Range", "Cos", "Sin")


def _constant_names(graph) -> set[str]:
    names = {i.name for i in graph.initializer}
    names |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    return names


def activation_pairs(model) -> list[str]:
    """Names of MatMul and Add nodes whose two inputs are both activations."""
    graph = model.graph
    consts = _constant_names(graph)
    return [n.name for n in graph.node
            if n.op_type in ("MatMul", "Add") and len(n.input) == 2 and not (set(n.input) & consts)]


def cast_fp16(src: str | Path, dst: str | Path, external_data: bool = False) -> dict:
    """Write an FP16 copy of ``src`` to ``dst``; returns counts of kept/cast nodes."""
    import onnx
    from onnxconverter_common import float16

    model = onnx.load(str(src))
    keep_nodes = activation_pairs(model)
    converted = float16.convert_float_to_float16(
        model, keep_io_types=True, op_block_list=list(KEEP_FP32_OPS), node_block_list=keep_nodes,
        disable_shape_infer=True)
    dst = Path(dst)
    if external_data:
        onnx.save_model(converted, dst, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=dst.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(converted, dst)
    onnx.checker.check_model(str(dst))
    kept = sum(1 for n in model.graph.node if n.op_type in KEEP_FP32_OPS) + len(keep_nodes)
    return {"nodes": len(model.graph.node), "kept_fp32": kept}
