"""Parity: every exported part against its PyTorch part, on the inputs the chain really
produces for real images and prompts drawn from their annotations (or, for images without
annotations, from a central region).

``parity_images`` chooses the images: one annotated image per modality from a data root in
the layout of ``../shared/data``; else the first image per modality in any folder the user
names; else the small real images shipped with the package (``earthgptx/samples``), so that a
build never needs ``../shared``. ``record_chain`` runs the PyTorch reference over them with
recording runners and returns, per part, the feeds it received and the outputs it gave.
``compare`` runs another runner on the same feeds and reports the worst tensor."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from calibration.dataset import MODALITY_WORDS
from earthgptx.data.readers import dota_samples, hrsid_samples, sirst_samples
from earthgptx.errors import EarthGPTXError
from earthgptx.generation import GenerationConfig
from earthgptx.imageio import IMAGE_SUFFIXES, read_image
from earthgptx.processing import MODALITIES, VisualPrompts, inside_point
from earthgptx.runner import Runner
from runners.recording import Recording, RecordingRunner

MAX_LISTED = 10_000  # files looked at in a user's folder before giving up on a modality


class ParityError(EarthGPTXError):
    """An exported part disagrees with its PyTorch part."""


@dataclass
class ParityImage:
    """An image the parity check runs the chain on. ``mask``/``box``: the object its visual
    prompts are drawn from (original frame; ``box`` XYXY edges), a central region where the
    image has no annotation."""

    path: Path
    modality: str
    mask: np.ndarray  # (H, W) bool
    box: tuple[float, float, float, float]


def _central(path: Path, modality: str) -> ParityImage:
    h, w = read_image(path).data.shape[:2]
    yy, xx = np.mgrid[:h, :w]
    mask = ((yy - h / 2) / (h / 4)) ** 2 + ((xx - w / 2) / (w / 4)) ** 2 <= 1.0
    return ParityImage(path, modality, mask, (w / 4, h / 4, 3 * w / 4, 3 * h / 4))


def _modality_in_name(path: Path) -> str | None:
    words = {w for part in path.parts for w in re.split(r"[^a-z0-9]+", part.lower())}
    return next((m for m, names in MODALITY_WORDS.items() if words & set(names)), None)


def _walk(root: Path):
    """Files under ``root`` in a stable order, lazily (a big folder is not listed whole)."""
    for folder, subfolders, files in os.walk(root):
        subfolders.sort()
        for name in sorted(files):
            yield Path(folder) / name


def parity_images(source: Path | None) -> tuple[list[ParityImage], str]:
    """The parity images and a line saying where they come from.

    ``source`` with ``SOURCES.md`` (the shared layout): one annotated image per modality
    (SIRST, HRSID, DOTA). Another folder: the first image per modality whose path names it
    (a folder or file name word: ``optical``/``rgb``/``eo``, ``sar``, ``infrared``/``ir``/``thermal``).
    ``None``: the images shipped in ``earthgptx/samples`` (optical and SAR)."""
    if source is None:
        from earthgptx.samples import sample_images

        images = [_central(path, modality) for path, modality in sample_images()]
        return images, "the sample images shipped with the package (earthgptx/samples: optical, SAR; no infrared)"
    source = Path(source)
    if (source / "SOURCES.md").is_file():
        picks = []
        for reader in (sirst_samples(source / "infrared" / "sirst"), hrsid_samples(source / "sar" / "hrsid"),
                       dota_samples(source / "optical" / "dota")):
            sample = next((s for s in reader if s.masks), None)
            if sample is None:
                raise EarthGPTXError(f"no annotated image found under {source} for parity checks")
            box = tuple(float(v) for v in sample.boxes[0])
            picks.append(ParityImage(sample.image, sample.modality, sample.masks[0], box))
        return picks, f"one annotated image per modality in {source}"
    found: dict[str, Path] = {}
    for n, path in enumerate(_walk(source)):
        if n >= MAX_LISTED or len(found) == len(MODALITIES):
            break
        modality = _modality_in_name(path.relative_to(source))
        if modality and modality not in found and path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
            found[modality] = path
    if not found:
        raise EarthGPTXError(f"--data {source}: no image whose folder or file name says its modality (optical, "
                             f"sar, infrared; e.g. {source}/sar/scene.tif); put the images in such folders")
    missing = [m for m in MODALITIES if m not in found]
    note = f" (none for {', '.join(missing)})" if missing else ""
    return [_central(found[m], m) for m in MODALITIES if m in found], f"the first image per modality in {source}{note}"


def requests(image: ParityImage) -> list[tuple[str, VisualPrompts, str]]:
    """(text, prompts, task) drawn from the image's object."""
    return [
        ("Segment <region1>.", VisualPrompts([inside_point(image.mask)], [], []), "segment"),
        ("What is in <region1> and <region2>?", VisualPrompts([], [image.box], [image.mask]), "region"),
        ("Where is the object nearest the top-left corner?", VisualPrompts([], [], []), "grounding"),
    ]


def record_chain(predictor, images: list[ParityImage], max_new_tokens: int = 3,
                 llm_calls: int = 12) -> dict[str, Recording]:
    """Run the reference ``predictor`` on the parity ``images``, recording every part."""
    limits = {"vision_encoder": 8, "prompt_encoder": 8, "llm": llm_calls, "pixel_decoder": 8}
    original = predictor.runners
    recorders = {name: RecordingRunner(r, limits[name]) for name, r in original.items()}
    predictor.runners = recorders
    try:
        for item in images:
            image = read_image(item.path).data
            for text, prompts, task in requests(item):
                predictor.predict(image, item.modality, text, prompts, task=task,
                                  generation=GenerationConfig(max_new_tokens=max_new_tokens))
    finally:
        predictor.runners = original
        predictor.clear_cache()
    return {name: r.recording for name, r in recorders.items()}


@dataclass
class ParityResult:
    """The worst output of a comparison (``metric``, ``value``, ``tolerance`` are that
    output's) and, in ``outputs``, every output's worst disagreement with its own metric
    and tolerance. ``passed``: every output within its tolerance."""

    metric: str
    value: float
    tolerance: float
    passed: bool
    worst_tensor: str
    cases: int
    outputs: dict[str, dict] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"metric": self.metric, "value": self.value, "tolerance": self.tolerance, "passed": self.passed,
                "worst_tensor": self.worst_tensor, "cases": self.cases, "outputs": self.outputs}

    def reason(self) -> str:
        return (f"output {self.worst_tensor!r} differs from PyTorch by {self.value:.3e} "
                f"({self.metric}, tolerance {self.tolerance:.0e})")


def compare(part: str, runner: Runner, recording: Recording, spec, precision: str) -> ParityResult:
    """Worst disagreement of ``runner`` with the recorded reference outputs, each output by
    the comparison its ``spec`` (``export.specs.ExportSpec``) declares at ``precision``:
    ``max_abs`` (FP32 by default), ``cosine`` distance (reduced precision by default),
    ``box_iou`` (``1 - IoU``, for boxes). The worst output is the one furthest over (or
    nearest to) its tolerance."""
    from .metrics import PARITY_METRICS

    if not recording.feeds:
        raise ParityError(f"{part}: no recorded inputs to compare on")
    worst: dict[str, float] = {}
    for feed, ref in zip(recording.feeds, recording.outputs):
        out = runner.infer(feed)
        for name, expected in ref.items():
            if name not in out:
                raise ParityError(f"{part}: output {name!r} is missing from the engine")
            got = np.asarray(out[name], dtype=np.float64)
            want = np.asarray(expected, dtype=np.float64)
            if got.shape != want.shape:
                raise ParityError(f"{part}: output {name!r} has shape {got.shape}, the reference {want.shape}")
            if want.size == 0:
                continue
            err = PARITY_METRICS[spec.comparison(name, precision)[0]](got, want)
            if not np.isfinite(err):
                err = float("inf")
            worst[name] = max(worst.get(name, 0.0), err)
    outputs = {}
    for name, value in worst.items():
        metric, tolerance = spec.comparison(name, precision)
        outputs[name] = {"metric": metric, "value": value, "tolerance": tolerance, "passed": value <= tolerance}
    if not outputs:
        raise ParityError(f"{part}: every recorded output is empty; nothing to compare")
    name = max(outputs, key=lambda n: (not outputs[n]["passed"], outputs[n]["value"] / max(outputs[n]["tolerance"], 1e-30)))
    w = outputs[name]
    return ParityResult(w["metric"], w["value"], w["tolerance"], all(o["passed"] for o in outputs.values()), name,
                        len(recording.feeds), outputs)
