"""The main job: build the four engines of a model into ``engines/<name>/``.

``run_build(options)`` is the typed entry point; ``export/build_engines.py`` and
``egx build`` are thin command lines over it. Every argument combination is checked
before any work (``check_options``); every engine is compared with its PyTorch part on
real imagery: a reduced-precision engine that fails falls back to FP32 (one decision per
part, the reason in the manifest), and an FP32 engine that fails fails the build after the
manifest records it."""
from __future__ import annotations

import datetime
import hashlib
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from earthgptx.config import PART_NAMES
from earthgptx.data import default_data_root
from earthgptx.errors import EarthGPTXError
from runners.manifest import ENGINES_ROOT, FORMAT, sha256_file, write_manifest

from .specs import SPECS, ShapeLimits


class BuildError(EarthGPTXError):
    """Options that cannot build; the message lists every problem and what to do."""


@dataclass
class BuildOptions:
    preset: str | None = None  # neither preset nor checkpoint: the default (checkpoint.resolve_source)
    checkpoint: str | None = None
    backends: dict[str, str] = field(default_factory=lambda: dict.fromkeys(PART_NAMES, "onnxruntime"))
    precisions: dict[str, str] = field(default_factory=lambda: dict.fromkeys(PART_NAMES, "fp32"))
    calibration: Path | None = None
    calibration_method: str = "max"
    calibration_modality: str | None = None
    calibration_images: int = 8  # per modality, sampled (calibration.sampling)
    evaluation_images: int = 30  # per modality, held out from calibration, for the INT8 gate
    gate: object = None  # gate.Gate; None means the defaults
    out: Path | None = None
    limits: ShapeLimits = field(default_factory=ShapeLimits)
    device: str = "cpu"
    data_root: Path | None = None  # images for the parity checks; None: the shared imagery, else the samples

    def parity_root(self) -> Path | None:
        """What ``parity.parity_images`` reads: ``data_root``; without it the shared imagery
        (``$EGX_DATA`` or ``../shared/data``) where it exists, else ``None`` (the package's samples)."""
        if self.data_root is not None:
            return Path(self.data_root)
        shared = default_data_root()
        return shared if (shared / "SOURCES.md").is_file() else None

    def __post_init__(self) -> None:
        from earthgptx.checkpoint import DEFAULT_MODEL_DIR, resolve_source

        self.preset, self.checkpoint = resolve_source(self.preset, self.checkpoint)
        self._is_default = self.checkpoint is not None and Path(self.checkpoint).resolve() == DEFAULT_MODEL_DIR.resolve()

    @property
    def name(self) -> str:
        """``default`` (the shipped trained model), the preset, or the checkpoint folder's name."""
        if self._is_default:
            return "default"
        return self.preset if self.preset else Path(self.checkpoint).name

    @property
    def out_dir(self) -> Path:
        return Path(self.out) if self.out else ENGINES_ROOT / self.name


def per_part(values: list[str], choices: tuple[str, ...], default: str, what: str) -> dict[str, str]:
    """``["tensorrt"]`` (all parts) and/or ``["llm=tensorrt-llm"]`` (one part) -> part -> value."""
    result = dict.fromkeys(PART_NAMES, default)
    for v in values:
        part, _, value = v.rpartition("=")
        if value not in choices:
            raise BuildError(f"--{what} {v!r}: {value!r} is not one of {', '.join(choices)}")
        if part and part not in PART_NAMES:
            raise BuildError(f"--{what} {v!r}: {part!r} is not a part; parts are {', '.join(PART_NAMES)}")
        for p in ([part] if part else PART_NAMES):
            result[p] = value
    return result


def check_options(opts: BuildOptions) -> None:
    """Refuse combinations that cannot build, before any work."""
    from earthgptx.checkpoint import load_config
    from earthgptx.config import preset

    problems = []
    config = None
    try:
        config = load_config(opts.checkpoint) if opts.checkpoint else preset(opts.preset)
    except EarthGPTXError as exc:
        problems.append(str(exc))
    if config is not None and config.llm.tokenizer is None:
        problems.append(f"preset {config.preset!r} has no weights or tokenizer (sizes only); build tiny or edge")
    for part, backend in opts.backends.items():
        precision = opts.precisions[part]
        if backend == "tensorrt-llm" and part != "llm":
            problems.append(f"{part}: tensorrt-llm builds only the llm (use --backend llm=tensorrt-llm)")
        if precision == "int8" and opts.calibration is None:
            problems.append(f"{part}: INT8 needs calibration data: add --calibration DIR (e.g. ../shared/data)")
        if precision == "int8" and backend == "tensorrt" and part == "llm":
            problems.append("llm: its INT8 forms are ONNX Runtime's (MatMulInteger, MatMulNBits); for TensorRT "
                            "build the llm with --backend llm=tensorrt-llm, or keep it fp16/fp32")
        if precision == "int8" and backend == "tensorrt-llm":
            problems.append("llm: TensorRT-LLM quantizes itself; build the llm in fp16 for tensorrt-llm")
        if backend == "onnxruntime" and precision == "fp16":
            problems.append(f"{part}: FP16 is built for TensorRT; ONNX Runtime on a CPU runs fp32 (or int8)")
    if any(b == "tensorrt" for b in opts.backends.values()):
        from runners.tensorrt_device import tensorrt_problem

        if (reason := tensorrt_problem()) is not None:
            problems.append(reason)
    if opts.backends["llm"] == "tensorrt-llm":
        from .tensorrt_llm import tensorrt_llm_problem

        if (reason := tensorrt_llm_problem()) is not None:
            problems.append(reason)
    if opts.device not in ("cpu", "cuda") and not opts.device.startswith("cuda:"):
        problems.append(f"--device {opts.device!r}: use cpu, cuda or cuda:N")
    if config is not None:
        problems += opts.limits.check(config)
    if opts.calibration_images < 1 or opts.evaluation_images < 1:
        problems.append(f"--calibration-images {opts.calibration_images} / --evaluation-images "
                        f"{opts.evaluation_images}: each needs at least 1 image per modality")
    if opts.calibration is not None and not Path(opts.calibration).is_dir():
        problems.append(f"--calibration {opts.calibration}: no such folder")
    if opts.data_root is not None and not Path(opts.data_root).is_dir():
        problems.append(f"--data {opts.data_root}: no such folder (name a folder of images, or leave --data out: "
                        "the shared imagery ($EGX_DATA or ../shared/data) or the package's sample images are used)")
    if problems:
        raise BuildError("cannot build:\n  - " + "\n  - ".join(problems))


def checkpoint_sha256(model) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def builder_info(device: str) -> dict:
    import onnx
    import onnxruntime
    import torch
    import transformers

    from runners.cpu import cpu_facts

    info = {"torch": torch.__version__, "transformers": transformers.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "tensorrt": None, "device": device,
            "host": platform.machine(), "cpu_count": os.cpu_count(), **cpu_facts()}
    try:
        import tensorrt

        info["tensorrt"] = tensorrt.__version__
    except ImportError:
        pass
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


@dataclass
class PartReport:
    part: str
    backend: str
    precision: str
    size_bytes: int
    parity: dict
    seconds: float


def run_build(opts: BuildOptions, console=None) -> list[PartReport]:
    """Build, check and record the engines. Raises ``BuildError`` on bad options and
    ``ParityError`` (after writing the manifest) when an FP32 engine disagrees with PyTorch
    (a reduced-precision one falls back to FP32 instead)."""
    from earthgptx.checkpoint import load_reference
    from earthgptx.predictor import Predictor

    from .onnx_export import export_onnx
    from .parity import ParityError, parity_images, record_chain
    from .progress import BuildConsole

    console = console or BuildConsole()
    check_options(opts)
    out = opts.out_dir
    out.mkdir(parents=True, exist_ok=True)
    with console.status(f"loading the {opts.name} model"):
        model, tokenizer = load_reference(opts.preset, opts.checkpoint)
    config = model.config
    with console.status("running the PyTorch reference on real imagery (parity inputs)"):
        predictor = Predictor.from_model(model, tokenizer)
        images, parity_source = parity_images(opts.parity_root())
        recordings = record_chain(predictor, images)
    console.print(f"parity images: {parity_source}", highlight=False)

    # 1. the FP32 ONNX of every part: what every backend and precision starts from
    onnx_paths, export_s = {}, {}
    for part in PART_NAMES:
        start = time.perf_counter()
        with console.status(f"{part}: exporting ONNX"):
            onnx_paths[part] = export_onnx(SPECS[part](config), getattr(model, part), out / f"{part}.onnx")
        export_s[part] = time.perf_counter() - start
        console.print(f"{part}: exported {onnx_paths[part].name} in {export_s[part]:.1f} s")
    # 2. explicit INT8 (Q/DQ or weight-only) where asked, kept only where the accuracy gate holds
    sources, precisions, quant, accuracy = dict(onnx_paths), dict(opts.precisions), {}, None
    int8_parts = [p for p in PART_NAMES if precisions[p] == "int8"]
    if int8_parts:
        from .int8 import build_int8

        sources, precisions, quant, accuracy = build_int8(opts, predictor, onnx_paths, int8_parts, recordings, console)
    # 3. per part: the backend's engine, parity with PyTorch, the manifest entry
    reports, engines = [], {}
    for part in PART_NAMES:
        spec = SPECS[part](config)
        backend, precision = opts.backends[part], precisions[part]
        start = time.perf_counter()
        runner, entry, parity = _engine_and_parity(part, spec, sources[part], precision, backend, quant.get(part, {}),
                                                   recordings[part], opts, model, console)
        if precision != "fp32" and not parity.passed:  # one decision per part: reduced precision falls back
            why = f"{backend} {precision} engine: {parity.reason()}"
            console.print(f"[yellow]{part} falls back to FP32:[/] {why}", highlight=False)
            precision = precisions[part] = "fp32"
            info = {**quant.get(part, {}), "fallback": {"to": "fp32", "reason": why}}
            runner, entry, parity = _engine_and_parity(part, spec, onnx_paths[part], precision, backend, info,
                                                       recordings[part], opts, model, console)
            if accuracy is not None and part in accuracy["int8_parts"]:
                accuracy["int8_parts"].remove(part)
                accuracy["fallback"][part] = why
                accuracy["decisions"][part].update({"precision": "fp32", "reason": why})
                accuracy["passed"] = None  # the gate measured this part in INT8; rebuild to measure again
        entry.update({
            "inputs": _tensors(spec.inputs, spec.profile(opts.limits, config)),
            "outputs": _tensors(spec.outputs, None),
            "sha256": sha256_file(out / entry["file"]),
            "parity": parity.to_json(),
        })
        if "extra_files" in entry:
            entry["extra_sha256"] = [sha256_file(out / f) for f in entry["extra_files"]]
        if part == "llm":
            np.save(out / "llm.embed_tokens.npy", model.llm.embed_table.detach().numpy())
            entry["embed_table"] = "llm.embed_tokens.npy"
            entry["kv_layout"] = {"layers": config.llm.layers, "kv_heads": config.llm.kv_heads,
                                  "head_dim": config.llm.head_dim, "layout": "batch, kv_heads, seq, head_dim",
                                  "past": "past_key_values.{i}.key|value", "present": "present.{i}.key|value"}
        engines[part] = entry
        size = sum((out / f).stat().st_size for f in [entry["file"], *entry.get("extra_files", [])])
        seconds = export_s[part] + time.perf_counter() - start
        reports.append(PartReport(part, backend, precision, size, parity.to_json(), seconds))
        mark = "[green]ok[/]" if parity.passed else "[red]FAILED[/]"
        console.print(f"{part}: {backend} {precision}, parity {parity.metric} {parity.value:.2e} "
                      f"(tolerance {parity.tolerance:.0e}) {mark}, {seconds:.1f} s")

    tok_dir = out / "tokenizer"
    shutil.rmtree(tok_dir, ignore_errors=True)
    tokenizer.save_pretrained(tok_dir)
    manifest = {
        "format": FORMAT, "preset": config.preset, "checkpoint_sha256": checkpoint_sha256(model),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "builder": builder_info(opts.device), "config": config.to_dict(), "tokenizer": "tokenizer",
        "limits": vars(opts.limits), "parity_images": parity_source, "engines": engines,
    }
    if accuracy is not None:
        manifest["accuracy"] = accuracy
    write_manifest(out, manifest)
    failed = [r for r in reports if not r.parity["passed"]]
    if failed:
        error = ParityError("; ".join(f"{r.part} ({r.precision}): output {r.parity['worst_tensor']!r} differs from "
                                    f"PyTorch by {r.parity['value']:.3e} ({r.parity['metric']}, tolerance "
                                    f"{r.parity['tolerance']:.0e})" for r in failed))
        error.reports = reports
        raise error
    return reports


def _engine_and_parity(part, spec, source: Path, precision: str, backend: str, info: dict, recording, opts,
                       model, console):
    """The backend's engine of ``part`` from ``source``, its manifest entry, and its parity
    with the PyTorch ``recording`` (``parity.compare`` with the spec's comparisons)."""
    from .parity import compare

    entry = {"file": source.name, "backend": backend, "precision": precision, **info}
    if backend == "onnxruntime":
        from runners.onnxruntime_runner import OnnxRuntimeRunner

        runner = OnnxRuntimeRunner(part, source, device=opts.device)
        if source.with_name(source.name + ".data").is_file():
            entry["extra_files"] = [source.name + ".data"]
    else:
        from .tensorrt_build import build_part

        runner, entry = build_part(part, spec, source, entry, opts, model, console)
    with console.status(f"{part}: comparing with PyTorch on {len(recording.feeds)} recorded inputs"):
        with runner:
            parity = compare(part, runner, recording, spec, precision)
    return runner, entry, parity


def _tensors(specs, profile) -> list[dict]:
    out = []
    for t in specs:
        d = {"name": t.name, "dtype": t.dtype, "shape": list(t.dims)}
        if profile is not None:
            d.update(profile[t.name])
        out.append(d)
    return out


def print_table(reports: list[PartReport], console) -> None:
    from rich.table import Table

    table = Table(title="engines")
    for col in ("part", "backend", "precision", "size", "parity vs PyTorch", "build s"):
        table.add_column(col, no_wrap=True)
    for r in reports:
        p = r.parity
        table.add_row(r.part, r.backend, r.precision, f"{r.size_bytes / 1e6:.1f} MB",
                      f"{p['metric']} {p['value']:.1e} {'ok' if p['passed'] else 'FAILED'}", f"{r.seconds:.1f}")
    console.print(table)
