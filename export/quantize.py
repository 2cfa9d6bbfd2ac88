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
The LLM gets weight-only INT8 (``MatMulNBits``, 8 bits, blocks of 128): batch-1 decode is
bound by memory bandwidth, so a 4x smaller weight read is the win; activations stay FP32."""
from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

import numpy as np

from earthgptx.errors import EarthGPTXError

from .fp16 import activation_pairs

METHODS = ("max", "entropy", "percentile")
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


def nodes_in_modules(model, modules: tuple[str, ...]) -> list[str]:
    """Nodes the exporter recorded as belonging to one of ``modules`` (their name scopes)."""
    import ast

    out = []
    for n in model.graph.node:
        for p in n.metadata_props:
            if p.key == "pkg.torch.onnx.name_scopes":
                try:
                    scopes = ast.literal_eval(p.value)
                except (ValueError, SyntaxError):
                    continue
                if any(s == m or s.startswith(m + ".") for s in scopes for m in modules):
                    out.append(n.name)
    return out


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


def quantize_weight_only(src: Path, dst: Path, block_size: int = 128) -> dict:
    """Weight-only INT8 (``MatMulNBits``, symmetric blocks) of every MatMul with a constant weight."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    model = onnx.load(str(src))
    cfg = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True, accuracy_level=4, bits=8)
    q = MatMulNBitsQuantizer(model, bits=8, block_size=block_size, is_symmetric=True, accuracy_level=4,
                             algo_config=cfg)
    q.process()
    dst.with_name(dst.name + ".data").unlink(missing_ok=True)
    q.model.save_model_to_file(str(dst), use_external_data_format=True)
    n = sum(1 for node in q.model.model.graph.node if node.op_type == "MatMulNBits")
    return {"method": f"weight-only INT8 (MatMulNBits, block {block_size})", "quantized_matmuls": n}
