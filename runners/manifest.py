"""``manifest.json``: what one build produced, and the only thing the runtime reads to
know what to run. Written by the exporters, read and checked here.

Top level: ``format``, ``preset``, ``checkpoint_sha256``, ``created``, ``builder``
(versions and device), ``config`` (the model config), ``tokenizer`` (folder), ``limits``
(the shape limits built for) and ``engines`` with exactly the four part names. Each engine:
``file``, ``backend``, ``precision``, ``inputs``/``outputs`` (name, dtype, shape with
named axes, min/opt/max), ``sha256``, ``parity``; the ``llm`` also ``embed_table`` and
``kv_layout``; TensorRT engines also ``device`` (TensorRT version, GPU, compute capability).
"""
from __future__ import annotations

import json
from pathlib import Path

from earthgptx.config import PART_NAMES, ModelConfig
from earthgptx.errors import EarthGPTXError
from earthgptx.hashing import sha256_file  # noqa: F401  (re-exported: export and runtime hash with it)

MANIFEST = "manifest.json"
FORMAT = "earthgptx-engines/1"
BACKENDS = ("onnxruntime", "tensorrt", "tensorrt-llm")
PRECISIONS = ("fp32", "fp16", "int8")
ENGINES_ROOT = Path(__file__).resolve().parents[1] / "engines"  # builds land in engines/<name>/ by default


class ManifestError(EarthGPTXError):
    """A build folder that cannot be run: missing, incomplete or mismatched files."""


def write_manifest(folder: Path, manifest: dict) -> Path:
    path = Path(folder) / MANIFEST
    path.write_text(json.dumps(manifest, indent=2))
    return path


def load_manifest(folder: str | Path, verify_files: bool = True) -> dict:
    """Read and check ``folder/manifest.json``. With ``verify_files`` every engine file
    must exist and match its recorded sha256 (a rebuilt or corrupted file is refused)."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise ManifestError(f"{folder} holds no {MANIFEST}: build engines first with python export/build_engines.py "
                            f"--out {folder}")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path} is not valid JSON ({exc}); rebuild the engines") from exc
    if manifest.get("format") != FORMAT:
        raise ManifestError(f"{path} has format {manifest.get('format')!r}, this runtime reads {FORMAT!r}; rebuild")
    engines = manifest.get("engines", {})
    if sorted(engines) != sorted(PART_NAMES):
        raise ManifestError(f"{path} must list exactly the engines {list(PART_NAMES)}, it lists {sorted(engines)}")
    for name, entry in engines.items():
        if entry.get("backend") not in BACKENDS:
            raise ManifestError(f"{path}: engine {name} has unknown backend {entry.get('backend')!r}")
        if not entry.get("parity", {}).get("passed", False):
            raise ManifestError(f"{path}: engine {name} failed its parity check at build time; rebuild it")
        if verify_files:
            files = [entry["file"]] + entry.get("extra_files", [])
            for rel, digest in zip(files, [entry["sha256"]] + entry.get("extra_sha256", [])):
                f = folder / rel
                if not f.is_file():
                    raise ManifestError(f"engine {name}: {f} is missing; rebuild with python export/build_engines.py")
                if sha256_file(f) != digest:
                    raise ManifestError(f"engine {name}: {f} does not match the manifest's sha256 (changed after the "
                                        "build); rebuild with python export/build_engines.py")
    return manifest


def manifest_config(manifest: dict) -> ModelConfig:
    try:
        return ModelConfig.from_dict(manifest["config"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ManifestError(f"manifest config is unusable: {exc}; rebuild the engines") from exc
