"""The printed ``egx bench`` table names each part's own precision inside an INT8 build."""
from __future__ import annotations

from rich.console import Console

from benchmarks.run import print_report


def _row(stage: str, backend: str, precision: str, ms: float) -> dict:
    return {"stage": stage, "backend": backend, "precision": precision, "median_ms": ms, "p95_ms": ms}


def test_a_part_left_in_fp32_by_the_gate_is_labelled_so():
    report = {"preset": "tiny", "machine": {"cpu": "x86_64", "cpu_model": "test CPU", "isa": ["avx2"], "cores": 2},
              "part_precisions": {"fp32": {"vision_encoder": "fp32", "prompt_encoder": "fp32"},
                                  "int8": {"vision_encoder": "fp32", "prompt_encoder": "int8"}},
              "decode_vs_bandwidth": {},
              "rows": [_row("vision_encoder", "pytorch", "fp32", 10.0), _row("prompt_encoder", "pytorch", "fp32", 4.0),
                       _row("vision_encoder", "onnxruntime", "int8", 8.0),
                       _row("prompt_encoder", "onnxruntime", "int8", 2.0),
                       _row("end_to_end_segmentation", "onnxruntime", "int8", 50.0)]}
    console = Console(width=200, record=True)
    print_report(report, console)
    lines = {line.split("│")[1].strip() + " " + line.split("│")[2].strip(): line.split("│")[3].strip()
             for line in console.export_text().splitlines() if line.startswith("│")}
    assert lines["vision_encoder onnxruntime"] == "int8 build, fp32 part"
    assert lines["prompt_encoder onnxruntime"] == "int8"
    assert lines["end_to_end_segmentation onnxruntime"] == "int8"
    assert lines["vision_encoder pytorch"] == "fp32"
