"""TensorRT engines from the parts' ONNX, written against the TensorRT 10.x (JetPack 6)
and 11.x Python APIs. ``tensorrt`` is imported lazily: this module loads everywhere.

* strongly typed networks (``STRONGLY_TYPED`` is required on 10.x and a no-op on 11.x);
  precision comes from the graph: FP16 from ``fp16.cast_fp16``, INT8 from Q/DQ nodes;
* every ONNX-parser error is reported, then the build fails;
* one optimisation profile per engine from the spec's min/opt/max;
* a timing cache kept beside the engines, a workspace limit (Jetson shares its memory);
* each engine is tagged with TensorRT version, GPU name and compute capability, and a
  runner refuses an engine built elsewhere (``runners.tensorrt_device``).
"""
from __future__ import annotations

from pathlib import Path

from runners.tensorrt_device import TensorRTError, current_device_tag

DEFAULT_WORKSPACE = 1 << 30  # 1 GiB: fits an Orin Nano beside the KV and image caches


def parse_errors(parser) -> list[str]:
    """Every error the ONNX parser recorded, as text."""
    out = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        out.append(f"{err.node_name() or '?'} ({err.node_operator() or '?'}): {err.desc()}"
                   if hasattr(err, "node_name") else str(err))
    return out


def build_engine(onnx_path: Path, engine_path: Path, profile: dict[str, dict[str, list[int]]],
                 workspace: int = DEFAULT_WORKSPACE, timing_cache: Path | None = None) -> dict:
    """Parse ``onnx_path`` into a strongly typed network, build it with one optimisation
    ``profile`` (input -> min/opt/max shapes), write ``engine_path``; returns the device tag."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # reads external data beside the file
        errors = parse_errors(parser)
        raise TensorRTError(f"TensorRT could not parse {onnx_path.name}:\n  " + "\n  ".join(errors or ["(no detail)"]))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
    opt = builder.create_optimization_profile()
    for name, shapes in profile.items():
        opt.set_shape(name, shapes["min"], shapes["opt"], shapes["max"])
    config.add_optimization_profile(opt)
    cache_bytes = timing_cache.read_bytes() if timing_cache and timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise TensorRTError(f"TensorRT failed to build {onnx_path.name} (see the TensorRT log above)")
    engine_path.write_bytes(bytes(plan))
    if timing_cache is not None:
        timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    return current_device_tag()


def build_part(part: str, spec, onnx_path: Path, entry: dict, opts, model, console):
    """Build ``part`` for TensorRT (FP16: from an FP16-cast copy of the ONNX). Returns the
    runner for the parity check and the manifest entry."""
    from runners.tensorrt_runner import TensorRTRunner

    from .fp16 import cast_fp16

    if opts.backends[part] == "tensorrt-llm":
        from .tensorrt_llm import build_llm

        return build_llm(spec, onnx_path, entry, opts, model, console)
    source = onnx_path
    if opts.precisions[part] == "fp16":
        source = onnx_path.with_name(f"{part}.fp16.onnx")
        with console.status(f"{part}: casting the ONNX to FP16 (norms, softmax, act x act kept FP32)"):
            entry["fp16_cast"] = cast_fp16(onnx_path, source, external_data=spec.external_data)
    engine_path = onnx_path.with_suffix(".engine")
    with console.status(f"{part}: building the TensorRT engine"):
        tag = build_engine(source, engine_path, spec.profile(opts.limits, model.config),
                           timing_cache=onnx_path.parent / "timing.cache")
    entry.update({"file": engine_path.name, "onnx": source.name, "device": tag})
    return TensorRTRunner(part, engine_path, entry), entry
