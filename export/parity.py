"""Parity: every exported part against its PyTorch part, on the inputs the chain really
produces for real images (``../shared/data``) and prompts drawn from their annotations.

``record_chain`` runs the PyTorch reference over the samples with recording runners and
returns, per part, the feeds it received and the outputs it gave. ``compare`` runs another
runner on the same feeds and reports the worst tensor."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from earthgptx.data.readers import Sample, dota_samples, hrsid_samples, sirst_samples
from earthgptx.errors import EarthGPTXError
from earthgptx.generation import GenerationConfig
from earthgptx.imageio import read_image
from earthgptx.processing import VisualPrompts, inside_point
from earthgptx.runner import Runner
from runners.recording import Recording, RecordingRunner


class ParityError(EarthGPTXError):
    """An exported part disagrees with its PyTorch part."""


def parity_samples(data_root: Path) -> list[Sample]:
    """One annotated image per modality: infrared (SIRST), SAR (HRSID), optical (DOTA)."""
    picks = []
    for source in (sirst_samples(data_root / "infrared" / "sirst"), hrsid_samples(data_root / "sar" / "hrsid"),
                   dota_samples(data_root / "optical" / "dota")):
        sample = next((s for s in source if s.masks), None)
        if sample is None:
            raise EarthGPTXError(f"no annotated image found under {data_root} for parity checks")
        picks.append(sample)
    return picks


def requests(sample: Sample) -> list[tuple[str, VisualPrompts, str]]:
    """(text, prompts, task) drawn from the sample's first object."""
    mask, box = sample.masks[0], tuple(float(v) for v in sample.boxes[0])
    return [
        ("Segment <region1>.", VisualPrompts([inside_point(mask)], [], []), "segment"),
        ("What is in <region1> and <region2>?", VisualPrompts([], [box], [mask]), "region"),
        ("Where is the object nearest the top-left corner?", VisualPrompts([], [], []), "grounding"),
    ]


def record_chain(predictor, data_root: Path, max_new_tokens: int = 3, llm_calls: int = 12) -> dict[str, Recording]:
    """Run the reference ``predictor`` on the parity samples, recording every part."""
    limits = {"vision_encoder": 8, "prompt_encoder": 8, "llm": llm_calls, "pixel_decoder": 8}
    original = predictor.runners
    recorders = {name: RecordingRunner(r, limits[name]) for name, r in original.items()}
    predictor.runners = recorders
    try:
        for sample in parity_samples(data_root):
            image = read_image(sample.image).data
            for text, prompts, task in requests(sample):
                predictor.predict(image, sample.modality, text, prompts, task=task,
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
