"""The CPU rewrite of symmetric int8 activation Q/DQ to uint8 (runners/qdq_cpu.py): lossless
when the Q/DQ nodes run literally, and what lets ONNX Runtime fuse integer MatMuls."""
import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from runners.qdq_cpu import has_int8_activations, to_unsigned_activations

C, N = 64, 50


@pytest.fixture(scope="module")
def qdq_model(tmp_path_factory):
    """LayerNorm -> 3 linear layers -> sum, quantized as the builds do (symmetric S8S8 QDQ)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(np.ones(C, np.float32), "g"), numpy_helper.from_array(np.zeros(C, np.float32), "b")]
    nodes = [helper.make_node("LayerNormalization", ["x", "g", "b"], ["ln"], axis=-1, name="ln")]
    for k in range(3):
        inits += [numpy_helper.from_array(rng.normal(size=(C, C)).astype(np.float32) * 0.1, f"w{k}"),
                  numpy_helper.from_array(rng.normal(size=C).astype(np.float32) * 0.1, f"bias{k}")]
        nodes += [helper.make_node("MatMul", ["ln", f"w{k}"], [f"m{k}"], name=f"mm{k}"),
                  helper.make_node("Add", [f"m{k}", f"bias{k}"], [f"a{k}"], name=f"add{k}")]
    nodes += [helper.make_node("Add", ["a0", "a1"], ["s"], name="s1"), helper.make_node("Add", ["s", "a2"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, N, C])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, N, C])], inits)
    folder = tmp_path_factory.mktemp("qdq")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), folder / "fp32.onnx")

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter([{"x": rng.normal(size=(1, N, C)).astype(np.float32)} for _ in range(4)])

        def get_next(self):
            return next(self.feeds, None)

    quantize_static(str(folder / "fp32.onnx"), str(folder / "int8.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True,
                    op_types_to_quantize=["MatMul"],
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
    return folder / "int8.onnx"


def session(model, level, optimized=None):
    opts = ort.SessionOptions()
    opts.graph_optimization_level = level
    opts.intra_op_num_threads = 1
    if optimized:
        opts.optimized_model_filepath = str(optimized)
    source = model if isinstance(model, (str, bytes)) else model.SerializeToString()
    return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])


def test_rewrite_is_lossless_and_enables_integer_kernels(qdq_model, tmp_path):
    x = {"x": np.random.default_rng(1).normal(size=(1, N, C)).astype(np.float32)}
    original = onnx.load(str(qdq_model))
    assert has_int8_activations(original)
    rewritten = onnx.load(str(qdq_model))
    changed = to_unsigned_activations(rewritten)
    assert changed >= 5 and not has_int8_activations(rewritten)
    weights = [i for i in rewritten.graph.initializer if i.data_type == TensorProto.INT8]
    assert weights, "int8 weights must stay int8"
    onnx.checker.check_model(rewritten)
    literal = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    a = session(original, literal).run(None, x)[0]
    b = session(rewritten, literal).run(None, x)[0]
    assert np.array_equal(a, b)  # the same integers, the same floats

    full = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    fused_a = session(original, full, tmp_path / "a.onnx").run(None, x)[0]
    fused_b = session(rewritten, full, tmp_path / "b.onnx").run(None, x)[0]
    ops_a = collections.Counter(n.op_type for n in onnx.load(str(tmp_path / "a.onnx")).graph.node)
    ops_b = collections.Counter(n.op_type for n in onnx.load(str(tmp_path / "b.onnx")).graph.node)
    assert ops_a["QLinearMatMul"] == 0 and ops_b["QLinearMatMul"] == 3
    cos = float(fused_a.ravel() @ fused_b.ravel() / np.linalg.norm(fused_a) / np.linalg.norm(fused_b))
    assert cos > 0.9999 and np.abs(fused_a - fused_b).max() < 0.05 * np.abs(fused_a).max()


def test_runner_rewrites_for_the_cpu_only(qdq_model):
    from runners.onnxruntime_runner import OnnxRuntimeRunner

    x = {"x": np.random.default_rng(2).normal(size=(1, N, C)).astype(np.float32)}
    runner = OnnxRuntimeRunner("vision_encoder", qdq_model, device="cpu", threads=1)
    runner.activate()
    assert runner.unsigned_activations >= 5
    rewritten = onnx.load(str(qdq_model))
    to_unsigned_activations(rewritten)
    expected = session(rewritten, ort.GraphOptimizationLevel.ORT_ENABLE_ALL).run(None, x)[0]
    np.testing.assert_array_equal(runner(x)["y"], expected)
    plain = OnnxRuntimeRunner("vision_encoder", qdq_model.parent / "fp32.onnx", device="cpu")
    plain.activate()
    assert plain.unsigned_activations == 0
