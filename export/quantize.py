"""Explicit INT8: Q/DQ ONNX from calibration feeds, the same file ONNX Runtime runs on a
CPU and a TensorRT builder consumes.

ONNX Runtime's ``quantize_static`` in QDQ format is used (NVIDIA ModelOpt's ONNX PTQ
installs here but brings ~6.5 GB of CUDA packages, pins clashing onnx/onnxruntime versions,
does not recognise dynamo-exported attention and casts unquantised ops to FP16, slow on a
CPU; on a small ViT both gave the same accuracy, ORT's file 4x smaller). Settings:
per-channel symmetric INT8 weights, symmetric INT8 activations (zero point 0, as TensorRT
requires), only MatMul/Conv/Gemm quantized, activation x activation matmuls (q.k^T, attn.v)
excluded, so LayerNorm, softmax and residual adds stay FP32.

Memory: the calibrators keep every calibrated activation of every feed they are given in
one pass (the histogram ones, entropy and percentile, all of them before binning: 36 edge
vision feeds did not fit in 24 GB). The feeds are therefore given ``chunk`` at a time (ORT's
``CalibStridedMinMax`` option, which drives any calibrator's ``collect_data`` once per chunk):
min/max ranges merge exactly, histograms are merged by ORT's ``HistogramCollector`` (a later
chunk with a wider range adds bins of the same width), so peak memory is one chunk's
activations plus the histograms, whatever the number of feeds.
The LLM has two INT8 forms (``LLM_FORMS``; the build tries them in this order and keeps the
first the accuracy gate accepts, ``int8.py``). Both read int8 weights (a decode step of batch 1
is bound by memory bandwidth: ~4x fewer bytes) and both run integer GEMMs; they differ in how
activations are quantized at run time (``benchmarks/int8_gemm.py`` measures the kernels):
* ``dynamic``: ``quantize_dynamic``'s ``MatMulInteger`` (U8S8, VNNI on x86), activations
  quantized per tensor: ~860 GFLOP/s for a 330-token prefill on one core, ~3x ``MatMulNBits``.
  One scale for every token of a prefill is coarse where a few channels or tokens carry large
  values, as the MLP's ``down_proj`` inputs do (on the trained default, all in this form: the
  worst token's last hidden state at cosine 0.65 to FP32, 0.95 with ``down_proj`` left to the
  other form), so ``down_proj`` and the LM head take the ``weight-only`` form.
* ``weight-only``: ``MatMulNBits``, 8-bit symmetric weight blocks of 128 with
  ``accuracy_level=4``: activations quantized per row and block of 128 (finer), int8 dot
  products; ~310 GFLOP/s at 330 tokens.
The LM head is a ``Gemm`` in the exported graph; it is rewritten as the equivalent ``MatMul``
first (``gemm_as_matmul``) so that its 28 M weights (113 MB in FP32, read at every decoded
token) are quantized too."""
from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

import numpy as np

from earthgptx.errors import EarthGPTXError

from .fp16 import activation_pairs

METHODS = ("max", "entropy", "percentile")
LLM_FORMS = ("dynamic", "weight-only")
PER_BLOCK_SCOPE = ".mlp.down_proj"  # modules whose activations one per-tensor scale serves badly
# feeds per calibrator pass; each adds ~2 GB at the edge preset (vision encoder, percentile:
# peak 3.0 GB with 1 feed a pass, 6.9 GB with 3; all 36 at once would be ~70 GB)
CHUNK = 2

log = logging.getLogger(__name__)


class FeedReader:
    """``onnxruntime.quantization.CalibrationDataReader`` over recorded feeds (feed dicts of
    ``{input_name: ndarray}``); ``set_range`` limits it to ``feeds[start:end]`` so that a
    calibrator can take them a chunk at a time."""

    def __init__(self, feeds: list[dict], input_names: list[str]) -> None:
        self.feeds, self.names = feeds, input_names
        self.i, self.end = 0, len(feeds)

    def __len__(self) -> int:
        return len(self.feeds)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.i, self.end = start_index, min(end_index, len(self.feeds))

    def get_next(self):
        if self.i >= self.end:
            return None
        feed = self.feeds[self.i]
        self.i += 1
        return {n: np.ascontiguousarray(feed[n]) for n in self.names}

    def rewind(self) -> None:
        self.i, self.end = 0, len(self.feeds)


def chunk_size(feeds: list[dict], chunk: int) -> int:
    """The largest chunk ``<= chunk`` that divides ``len(feeds)`` (ORT takes equal chunks) and
    whose chunks each hold feeds of one shape (ORT's histogram collector stacks a chunk's
    activations into one array: a prompt encoder's feeds differ in their number of prompts)."""
    if chunk < 1:
        raise EarthGPTXError(f"calibration chunk must be at least 1 feed, got {chunk}")
    shapes = [tuple(sorted((k, np.shape(v)) for k, v in f.items())) for f in feeds]
    for d in range(min(chunk, len(feeds)), 1, -1):
        if len(feeds) % d == 0 and all(len(set(shapes[i:i + d])) == 1 for i in range(0, len(feeds), d)):
            return d
    return 1


def _scopes(node) -> list[str]:
    """The module paths the exporter recorded for ``node`` (outermost first)."""
    import ast

    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            try:
                return list(ast.literal_eval(p.value))
            except (ValueError, SyntaxError):
                return []
    return []


def nodes_in_modules(model, modules: tuple[str, ...]) -> list[str]:
    """Nodes the exporter recorded as belonging to one of ``modules`` (their name scopes)."""
    return [n.name for n in model.graph.node
            if any(s == m or s.startswith(m + ".") for s in _scopes(n) for m in modules)]


def nodes_in_scopes_ending(model, suffix: str) -> list[str]:
    """Nodes inside any module whose path ends with ``suffix`` (e.g. every layer's ``.mlp.down_proj``)."""
    return [n.name for n in model.graph.node if any(s.endswith(suffix) for s in _scopes(n))]


class _PreprocessAdvice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()


@contextlib.contextmanager
def _without_preprocess_advice():
    """``quantize_static`` logs "Please consider to run pre-processing before quantization"
    unless the model carries ONNX Runtime's pre-processing tag. What that pre-processing does
    (shape inference, constant folding) ``onnx_export`` already did: the dynamo exporter runs
    with ``optimize=True`` and every file is shape-inferred after saving. The line is advice
    for other graphs, so it is not shown to users of this one."""
    quiet = _PreprocessAdvice()
    root = logging.getLogger()
    root.addFilter(quiet)
    try:
        yield
    finally:
        root.removeFilter(quiet)


def quantize_qdq(src: Path, dst: Path, feeds: list[dict], method: str = "max",
                 keep_fp32: tuple[str, ...] = (), chunk: int = CHUNK) -> dict:
    """Static QDQ INT8 of ``src`` calibrated on ``feeds`` (``chunk`` feeds per calibrator
    pass, see the module's note on memory), leaving the nodes of the ``keep_fp32`` modules in
    FP32; returns what was done."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if method not in METHODS:
        raise EarthGPTXError(f"calibration method {method!r} is not one of {', '.join(METHODS)}")
    if not feeds:
        raise EarthGPTXError(f"{src}: no calibration feeds; record them from calibration imagery first")
    calib = {"max": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
             "percentile": CalibrationMethod.Percentile}[method]
    model = onnx.load(str(src), load_external_data=False)
    kept = nodes_in_modules(model, keep_fp32)
    exclude = activation_pairs(model) + kept
    names = [i.name for i in model.graph.input]
    stride = chunk_size(feeds, chunk)
    chatter = io.StringIO()  # the histogram collector prints a line per chunk
    with contextlib.redirect_stdout(chatter), _without_preprocess_advice():
        quantize_static(
            str(src), str(dst), FeedReader(feeds, names), quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul", "Conv", "Gemm"], nodes_to_exclude=exclude, calibrate_method=calib,
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "CalibMovingAverage": False,
                           "CalibStridedMinMax": stride},
        )
    log.debug("onnxruntime calibration of %s: %s", src.name, chatter.getvalue())
    quantized = onnx.load(str(dst), load_external_data=False)
    n_q = sum(1 for n in quantized.graph.node if n.op_type == "QuantizeLinear")
    return {"method": f"onnxruntime quantize_static QDQ ({method})",
            "excluded_act_x_act": len(exclude) - len(kept), "kept_fp32_modules": list(keep_fp32),
            "quantize_nodes": n_q, "calibration_feeds": len(feeds), "calibration_chunk": stride}


def gemm_as_matmul(model) -> int:
    """Rewrite in place every ``Gemm`` with a constant weight, no bias (or ``beta`` 0) and
    ``alpha`` 1 as ``MatMul`` with the weight stored ``(K, N)``: the same numbers, in the one form
    the weight-only quantizer takes. Returns how many were rewritten."""
    from onnx import helper, numpy_helper

    weights = {i.name: i for i in model.graph.initializer}
    uses: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    n = 0
    for i, node in enumerate(model.graph.node):
        if node.op_type != "Gemm" or node.input[1] not in weights or uses[node.input[1]] > 1:
            continue
        a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
        has_bias = len(node.input) > 2 and node.input[2] and a.get("beta", 1.0) != 0.0
        if a.get("transA", 0) or has_bias or a.get("alpha", 1.0) != 1.0:
            continue
        w = weights[node.input[1]]
        if a.get("transB", 0):
            array = numpy_helper.to_array(w).T.copy()
            w.CopyFrom(numpy_helper.from_array(array, w.name))
            for infos in (model.graph.value_info, model.graph.input):  # a recorded (N, K) shape no longer holds
                for info in [v for v in infos if v.name == w.name]:
                    infos.remove(info)
        matmul = helper.make_node("MatMul", [node.input[0], node.input[1]], list(node.output), name=node.name)
        matmul.metadata_props.extend(node.metadata_props)
        model.graph.node.remove(node)
        model.graph.node.insert(i, matmul)
        n += 1
    return n


def _save(model, dst: Path) -> None:
    """``model`` to ``dst`` with its weights in ``dst.name + '.data'`` beside it."""
    import onnx

    dst.with_name(dst.name + ".data").unlink(missing_ok=True)
    onnx.save(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
              location=dst.name + ".data", size_threshold=1024)


def _weight_only(model, block_size: int):
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    cfg = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True, accuracy_level=4, bits=8)
    q = MatMulNBitsQuantizer(model, bits=8, block_size=block_size, is_symmetric=True, accuracy_level=4,
                             algo_config=cfg)
    q.process()
    return q.model.model


def quantize_weight_only(src: Path, dst: Path, block_size: int = 128) -> dict:
    """Weight-only INT8 (``MatMulNBits``, symmetric blocks, int8 compute) of every MatMul with a
    constant weight, the LM head included (``gemm_as_matmul``)."""
    import onnx

    model = onnx.load(str(src))
    heads = gemm_as_matmul(model)
    model = _weight_only(model, block_size)
    _save(model, dst)
    n = sum(1 for node in model.graph.node if node.op_type == "MatMulNBits")
    return {"method": f"weight-only INT8 (MatMulNBits, block {block_size}, int8 compute)", "form": "weight-only",
            "quantized_matmuls": n, "gemm_rewritten": heads}


def quantize_dynamic_int8(src: Path, dst: Path, block_size: int = 128) -> dict:
    """The LLM's ``dynamic`` INT8 form: ``MatMulInteger`` with per-channel int8 weights and
    activations quantized per tensor at run time for every MatMul with a constant weight,
    except the modules under ``PER_BLOCK_SCOPE`` and the LM head, which take the weight-only
    form (per-block activations); see the module's note."""
    import tempfile

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(src))
    gemm_as_matmul(model)
    per_block = nodes_in_scopes_ending(model, PER_BLOCK_SCOPE)
    weights = {i.name for i in model.graph.initializer}
    const_matmuls = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in weights]
    head = [n.name for n in const_matmuls if any(s.endswith("lm_head") for s in _scopes(n))]
    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp:
        staged = Path(tmp) / "dynamic.onnx"
        with _without_preprocess_advice():
            quantize_dynamic(model, str(staged), op_types_to_quantize=["MatMul"], per_channel=True,
                             weight_type=QuantType.QInt8, nodes_to_exclude=per_block + head,
                             use_external_data_format=True, extra_options={"MatMulConstBOnly": True})
        model = _weight_only(onnx.load(str(staged)), block_size)
    _save(model, dst)
    ops = [n.op_type for n in model.graph.node]
    return {"method": f"dynamic INT8 (MatMulInteger, activations per tensor; {PER_BLOCK_SCOPE.lstrip('.')} and "
                      f"the LM head weight-only, block {block_size})", "form": "dynamic",
            "integer_matmuls": ops.count("MatMulInteger"), "quantized_matmuls": ops.count("MatMulNBits"),
            "per_block_modules": len(per_block) + len(head)}


def quantize_llm(src: Path, dst: Path, form: str) -> dict:
    """The LLM's INT8 file in ``form`` (one of ``LLM_FORMS``)."""
    if form == "dynamic":
        return quantize_dynamic_int8(src, dst)
    if form == "weight-only":
        return quantize_weight_only(src, dst)
    raise EarthGPTXError(f"unknown LLM INT8 form {form!r}; one of {', '.join(LLM_FORMS)}")
