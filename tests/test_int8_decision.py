"""One decision per INT8 part: the gate and the parity check agree. A part that fails
either falls back to FP32 on its own, with the reason in the manifest; only an FP32 part
that fails parity fails the build."""
import dataclasses

import pytest

from export.gate import Gate
from export.int8 import decide


def _report(mask_iou: float) -> dict:
    s = {"n": 30, "mean": mask_iou, "worst": mask_iou, "p5": mask_iou}
    g = {"images": 30, "requests": 30, "mask_iou": s, "box_iou": None, "token_agreement": None,
         "answer_agreement": None}
    return {"sar": {**g, "per_dataset": {"d": g}, "per_size": {"small": g}}}


def test_decide_falls_back_per_part_with_the_reason():
    """vision_encoder fails parity; llm breaks the gate alone; prompt_encoder and pixel_decoder
    pass alone but not together (the last in chain order goes)."""
    def evaluate(int8_parts):
        parts = set(int8_parts)
        if "llm" in parts:
            return _report(0.90)
        if {"prompt_encoder", "pixel_decoder"} <= parts:
            return _report(0.97)
        return _report(0.999)

    parts = ["vision_encoder", "prompt_encoder", "llm", "pixel_decoder"]
    fallback, report = decide(parts, {"vision_encoder": "output 'x' differs"}, evaluate, Gate())
    assert fallback["vision_encoder"] == "parity: output 'x' differs"
    assert fallback["llm"].startswith("gate, alone in INT8: sar mask_iou mean 0.9000 < 0.98")
    assert fallback["pixel_decoder"].startswith("gate, combined with the other INT8 parts")
    assert set(fallback) == {"vision_encoder", "llm", "pixel_decoder"} and not Gate().failures(report)


def test_a_part_that_falls_back_gets_one_trial_in_its_second_form():
    """The LLM's faster INT8 form breaks the gate; its second form, tried beside the parts kept,
    passes and is kept. Where the second form fails too, both reasons are recorded."""
    form = {"llm": "dynamic"}

    def evaluate(int8_parts):
        return _report(0.90 if "llm" in int8_parts and form["llm"] == "dynamic" else 0.999)

    def switch():
        form["llm"] = "weight-only"
        return None

    parts = ["vision_encoder", "prompt_encoder", "llm", "pixel_decoder"]
    fallback, report = decide(parts, {}, evaluate, Gate(), {"llm": switch})
    assert fallback == {} and form["llm"] == "weight-only" and not Gate().failures(report)

    form["llm"] = "dynamic"
    fallback, _ = decide(parts, {}, evaluate, Gate(), {"llm": lambda: "output 'logits' differs"})
    assert fallback["llm"].startswith("gate, alone in INT8: sar mask_iou mean 0.9000")
    assert fallback["llm"].endswith("; second form, parity: output 'logits' differs")
    assert set(fallback) == {"llm"}


def test_gate_checks_every_group_and_the_5th_percentile():
    gate = Gate()
    assert gate.failures(_report(0.99)) == []
    r = _report(0.99)
    r["sar"]["per_size"]["small"] = {**r["sar"]["per_size"]["small"],
                                     "mask_iou": {"n": 30, "mean": 0.985, "worst": 0.5, "p5": 0.9}}
    assert gate.failures(r) == ["sar small objects mask_iou 5th percentile 0.9000 < 0.95"]


def _impossible(monkeypatch, part: str, output: str, precision: str) -> None:
    """Make ``part``'s ``output`` fail parity at ``precision`` through its spec (tolerance < 0)."""
    from export.specs import SPECS, Comparison

    original = SPECS[part]

    def spec(config):
        s = original(config)
        metric = s.comparison(output, precision)[0]
        return dataclasses.replace(s, comparisons={**s.comparisons, output: Comparison(metric, {precision: -1.0})})

    monkeypatch.setitem(SPECS, part, spec)


def _build(out, data_root, calibration, precision="int8"):
    from export.build import BuildOptions, per_part, run_build
    from runners.manifest import PRECISIONS

    return run_build(BuildOptions(preset="tiny", out=out, data_root=data_root, calibration=calibration,
                                  evaluation_images=2, calibration_images=2,
                                  precisions=per_part([precision], PRECISIONS, "fp32", "precision")))


@pytest.fixture(scope="module")
def small_root(tmp_path_factory, data_root):
    import shutil

    root = tmp_path_factory.mktemp("few")
    for folder in ("infrared/sirst", "sar/hrsid", "optical/dota"):
        shutil.copytree(data_root / folder, root / folder)
    return root


@pytest.mark.parametrize("where", ["int8 stage", "engine build"])
def test_a_part_failing_parity_falls_back_instead_of_failing_the_build(tmp_path, data_root, small_root,
                                                                      monkeypatch, where):
    """``int8 stage``: the INT8 candidate's parity fails before the gate. ``engine build``: the
    INT8 stage's parity is made to pass (as a different backend's engine might), so the part
    passes the gate and fails parity only when its engine is checked; it falls back there."""
    from export import int8
    from runners.manifest import load_manifest

    _impossible(monkeypatch, "prompt_encoder", "region_tokens", "int8")
    if where == "engine build":
        real = int8.parity_of

        def passing(*args, **kwargs):
            return dataclasses.replace(real(*args, **kwargs), passed=True)

        monkeypatch.setattr(int8, "parity_of", passing)
    reports = _build(tmp_path / "b", data_root, small_root)
    m = load_manifest(tmp_path / "b")
    e, acc = m["engines"]["prompt_encoder"], m["accuracy"]
    assert e["precision"] == "fp32" and e["file"] == "prompt_encoder.onnx" and e["parity"]["passed"]
    reason = acc["fallback"]["prompt_encoder"]
    assert "region_tokens" in reason and "tolerance" in reason and e["fallback"]["reason"] == reason
    assert acc["decisions"]["prompt_encoder"] == {"precision": "fp32", "int8_parity": where == "engine build",
                                                 "reason": reason}
    assert reason.startswith("parity:" if where == "int8 stage" else "onnxruntime int8 engine:")
    assert "prompt_encoder" not in acc["int8_parts"] and all(r.parity["passed"] for r in reports)


def test_an_fp32_part_failing_parity_fails_the_build(tmp_path, data_root, monkeypatch):
    from export.parity import ParityError

    _impossible(monkeypatch, "pixel_decoder", "scores", "fp32")
    with pytest.raises(ParityError, match=r"pixel_decoder \(fp32\): output 'scores'"):
        _build(tmp_path / "f", data_root, None, precision="fp32")
    assert (tmp_path / "f" / "manifest.json").is_file()  # recorded before failing
