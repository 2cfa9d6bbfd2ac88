"""Open a build folder: read its manifest, create one runner per engine, and chain them
with the same ``Predictor`` the PyTorch reference uses."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from earthgptx.config import PART_NAMES
from earthgptx.image_cache import DEFAULT_CACHE_BYTES, DEFAULT_PREFIX_CACHE_BYTES
from earthgptx.predictor import Predictor

from .manifest import ManifestError, load_manifest, manifest_config


def make_runner(name: str, entry: dict, folder: Path, device: str, threads: int | None = None):
    backend = entry["backend"]
    if backend == "onnxruntime":
        from .onnxruntime_runner import OnnxRuntimeRunner

        return OnnxRuntimeRunner(name, folder / entry["file"], device=device, threads=threads)
    if backend == "tensorrt":
        from .tensorrt_runner import TensorRTRunner

        return TensorRTRunner(name, folder / entry["file"], entry)
    if backend == "tensorrt-llm":  # text from TensorRT-LLM; this graph gives the [SEG] states
        from .onnxruntime_runner import OnnxRuntimeRunner

        return OnnxRuntimeRunner(name, folder / entry["file"], device=device, threads=threads)
    raise ManifestError(f"engine {name}: unknown backend {backend!r}; rebuild the engines")


def open_predictor(folder: str | Path, device: str = "auto", threads: int | None = None,
                   cache_bytes: int = DEFAULT_CACHE_BYTES,
                   prefix_cache_bytes: int = DEFAULT_PREFIX_CACHE_BYTES) -> Predictor:
    """A ``Predictor`` over the engines in ``folder`` (read from its manifest alone).
    ``threads``: ONNX Runtime intra-op threads per engine (None: all cores);
    ``cache_bytes``: the image-embedding cache's bound; ``prefix_cache_bytes``: the bound of
    the cache of each image's prompt-prefix KV (``Predictor.prefix_cache``)."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    manifest = load_manifest(folder)
    config = manifest_config(manifest)
    engines = manifest["engines"]
    runners = {name: make_runner(name, engines[name], folder, device, threads) for name in PART_NAMES}
    table_path = folder / engines["llm"]["embed_table"]
    if not table_path.is_file():
        raise ManifestError(f"{table_path} is missing; rebuild with python export/build_engines.py")
    table = np.load(table_path, mmap_mode="r")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder / manifest["tokenizer"], local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ManifestError(f"cannot load the tokenizer in {folder / manifest['tokenizer']}: {exc}") from exc
    for runner in runners.values():
        runner.activate()
    generator = None
    if engines["llm"]["backend"] == "tensorrt-llm":
        from .tensorrt_llm_runner import PromptTableTextGenerator, TensorRTLLMEngine

        generator = PromptTableTextGenerator(TensorRTLLMEngine(folder / engines["llm"]["trtllm_engine_dir"]))
    return Predictor(runners, tokenizer, config, table, cache_bytes=cache_bytes, text_generator=generator,
                     prefix_cache_bytes=prefix_cache_bytes)
