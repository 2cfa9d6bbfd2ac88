"""The CPU rewrite of symmetric int8 activation Q/DQ to uint8 (runners/qdq_cpu.py): lossless
when the Q/DQ nodes run literally, and what lets ONNX Runtime fuse integer MatMuls; and of
int8 weights to uint8 where the CPU's u8 x s8 kernels saturate (x86 without VNNI)."""
import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from runners.cpu import u8s8_saturates
from runners.qdq_cpu import (has_int8_activations, has_int8_weights, prepare_for_cpu, to_unsigned_activations,
                              to_unsigned_weights)

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

    if u8s8_saturates():  # as the runner does there: uint8 weights too (test_unsigned_weights_are_lossless)
        to_unsigned_weights(rewritten)
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
    assert runner.unsigned_weights == (3 if u8s8_saturates() else 0)  # this CPU's kernels decide
    rewritten = onnx.load(str(qdq_model))
    prepare_for_cpu(rewritten, u8s8_saturates())
    expected = session(rewritten, ort.GraphOptimizationLevel.ORT_ENABLE_ALL).run(None, x)[0]
    np.testing.assert_array_equal(runner(x)["y"], expected)
    plain = OnnxRuntimeRunner("vision_encoder", qdq_model.parent / "fp32.onnx", device="cpu")
    plain.activate()
    assert plain.unsigned_activations == 0


def test_unsigned_weights_are_lossless(qdq_model, tmp_path):
    """int8 weights and their zero points + 128: the Q/DQ graph computes the same numbers when
    run literally, and fused into integer kernels it stays at the literal result."""
    x = {"x": np.random.default_rng(3).normal(size=(1, N, C)).astype(np.float32)}
    original = onnx.load(str(qdq_model))
    rewritten = onnx.load(str(qdq_model))
    assert has_int8_weights(rewritten)
    counts = prepare_for_cpu(rewritten, saturates=True)
    assert counts["unsigned_weights"] == 3 and not has_int8_weights(rewritten)
    assert not [i.name for i in rewritten.graph.initializer if i.data_type == TensorProto.INT8]
    onnx.checker.check_model(rewritten)
    literal = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    a = session(original, literal).run(None, x)[0]
    np.testing.assert_array_equal(session(rewritten, literal).run(None, x)[0], a)
    fused = session(rewritten, ort.GraphOptimizationLevel.ORT_ENABLE_ALL, tmp_path / "f.onnx").run(None, x)[0]
    assert collections.Counter(n.op_type for n in onnx.load(str(tmp_path / "f.onnx")).graph.node)["QLinearMatMul"] == 3
    assert float(fused.ravel() @ a.ravel() / np.linalg.norm(fused) / np.linalg.norm(a)) > 0.9999


@pytest.mark.parametrize("zero_point", [True, False])
def test_unsigned_weights_make_integer_matmuls_exact(zero_point):
    """``MatMulInteger`` (the LLM's dynamic INT8 form) with large uint8 activations and int8
    weights near +-127, per-column zero points: after the rewrite ONNX Runtime's result is the
    exact integer product on any CPU (u8 x s8 pairs of this size overflow int16, which is where
    VNNI-less kernels saturate). Without a ``b_zero_point`` (0) the rewrite adds one of 128."""
    rng = np.random.default_rng(4)
    k, n = 256, 64
    b = rng.choice(np.array([-127, -120, 120, 127], np.int8), size=(k, n))
    zp = np.zeros(n, np.int8)
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "b", "", "b_zp"] if zero_point else ["a", "b"], ["y"])], "mmi",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [4, k])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [4, n])],
        [numpy_helper.from_array(b, "b")] + ([numpy_helper.from_array(zp, "b_zp")] if zero_point else []))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert to_unsigned_weights(model) == 1 and not has_int8_weights(model)
    onnx.checker.check_model(model)
    a = rng.integers(200, 256, size=(4, k), dtype=np.uint8)
    y = session(model, ort.GraphOptimizationLevel.ORT_ENABLE_ALL).run(None, {"a": a})[0]
    np.testing.assert_array_equal(y, a.astype(np.int64) @ b.astype(np.int64))
