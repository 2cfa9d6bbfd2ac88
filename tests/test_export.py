"""Exporters on the tiny preset: specs, adapters, ONNX graphs vs PyTorch, the build,
its manifest, and the chain run from the manifest alone."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO
from earthgptx.config import PART_NAMES, preset
from export.specs import SPECS, ShapeLimits

SAR = "../shared/data/sar/hrsid/P0094_0_800_3000_3800.png"


@pytest.fixture(scope="module")
def built(tiny_build):
    return tiny_build


def test_registry_and_profiles():
    cfg = preset("tiny")
    assert list(SPECS) == list(PART_NAMES)
    limits = ShapeLimits(max_batch=3, max_prompts=5, max_seq=300, max_kv=600)
    prof = SPECS["llm"](cfg).profile(limits, cfg)
    assert prof["inputs_embeds"]["min"] == [1, 1, 64] and prof["inputs_embeds"]["max"] == [3, 300, 64]
    assert prof["past_key_values.0.key"]["min"][2] == 0 and prof["past_key_values.0.key"]["max"][2] == 599
    assert prof["attention_mask"]["max"] == [3, 600]
    pe = SPECS["prompt_encoder"](cfg).profile(limits, cfg)
    assert pe["prompt_masks"]["max"] == [3, 5, 32, 32]
    for name, make in SPECS.items():
        spec = make(cfg)
        assert all(v >= 2 for v in spec.example_sizes.values()), name  # dims of size 1 would be frozen
        assert set(spec.tolerance) == {"fp32", "fp16", "int8"}


def test_shape_limits_are_checked():
    cfg = preset("tiny")
    assert ShapeLimits().check(cfg) == []
    problems = ShapeLimits(max_prompts=20, max_kv=10_000, max_seq=20).check(cfg)
    assert any("region tokens" in p for p in problems) and any("positions" in p for p in problems)
    assert any("cannot hold a prompt" in p for p in problems)


def test_traceable_mask_decoder_matches_sam_decoder(tiny):
    from export.adapters import pixel_decoder_adapter

    model = tiny[0]
    spec = SPECS["pixel_decoder"](model.config)
    ex = spec.example_inputs({"batch": 2, "queries": 3, "points": 2}, seed=3)
    ex["point_labels"] = torch.tensor([1, 2]).repeat(2, 3, 1)
    args = [ex[n] for n in spec.input_names]
    with torch.no_grad():
        ref = model.pixel_decoder(*args)
        out = pixel_decoder_adapter(model.pixel_decoder)(*args)
    for a, b in zip(ref, out):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert model.pixel_decoder.mask_decoder.__class__.__name__ == "SamMaskDecoder"  # the original is untouched


@pytest.mark.parametrize("sizes", [
    {"batch": 1, "regions": 1, "queries": 1, "points": 1, "seq": 5, "past": 0, "total": 5},
    {"batch": 3, "regions": 4, "queries": 4, "points": 3, "seq": 1, "past": 6, "total": 7},
])
def test_onnx_graphs_match_pytorch_at_other_shapes(built, tiny, sizes):
    from runners.onnxruntime_runner import OnnxRuntimeRunner

    folder, _ = built
    model = tiny[0]
    for part in PART_NAMES:
        spec = SPECS[part](model.config)
        ex = spec.example_inputs(sizes, seed=5)
        if part == "prompt_encoder":
            ex["prompt_types"] = torch.randint(-1, 3, ex["prompt_types"].shape, generator=torch.Generator().manual_seed(0))
        if part == "pixel_decoder":
            ex["point_labels"] = torch.randint(-1, 4, ex["point_labels"].shape, generator=torch.Generator().manual_seed(0))
        if part == "llm":
            ex["attention_mask"][:] = 1
            ex["position_ids"] = torch.arange(sizes["past"], sizes["total"])[None].repeat(sizes["batch"], 1)
        with torch.no_grad():
            ref = getattr(model, part)(*[ex[n] for n in spec.input_names])
        ref = (ref,) if isinstance(ref, torch.Tensor) else ref
        with OnnxRuntimeRunner(part, folder / f"{part}.onnx", device="cpu") as r:
            out = r({k: v.numpy() for k, v in ex.items()})
        for name, expected in zip(spec.output_names, ref):
            np.testing.assert_allclose(out[name], expected.numpy(), atol=1e-4, rtol=1e-4, err_msg=f"{part}.{name}")


def test_llm_graph_left_padding_matches_batch_one(built, tiny):
    from earthgptx.llm import kv_names
    from runners.onnxruntime_runner import OnnxRuntimeRunner

    folder, _ = built
    cfg = tiny[0].config.llm
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(6, cfg.hidden)).astype(np.float32), rng.normal(size=(4, cfg.hidden)).astype(np.float32)
    empty = lambda n: {k: np.zeros((n, cfg.kv_heads, 0, cfg.head_dim), np.float32)  # noqa: E731
                       for k in kv_names(cfg.layers, "past_key_values")}
    with OnnxRuntimeRunner("llm", folder / "llm.onnx", device="cpu") as llm:
        mask = np.array([[1] * 6, [0, 0, 1, 1, 1, 1]])
        batch = llm({"inputs_embeds": np.stack([a, np.concatenate([np.zeros((2, cfg.hidden), np.float32), b])]),
                     "attention_mask": mask, "position_ids": np.clip(mask.cumsum(-1) - 1, 0, None), **empty(2)})
        single = llm({"inputs_embeds": b[None], "attention_mask": np.ones((1, 4), np.int64),
                      "position_ids": np.arange(4)[None], **empty(1)})
        np.testing.assert_allclose(batch["logits"][1], single["logits"][0], atol=1e-4)
        # one decode step on top of each cache
        step = rng.normal(size=(1, 1, cfg.hidden)).astype(np.float32)
        past_b = {p: batch[n] for p, n in zip(kv_names(cfg.layers, "past_key_values"), kv_names(cfg.layers, "present"))}
        past_s = {p: single[n] for p, n in zip(kv_names(cfg.layers, "past_key_values"), kv_names(cfg.layers, "present"))}
        nb = llm({"inputs_embeds": np.concatenate([step, step]), "attention_mask": np.concatenate([mask, [[1], [1]]], 1),
                  "position_ids": np.array([[6], [4]]), **past_b})
        ns = llm({"inputs_embeds": step, "attention_mask": np.ones((1, 5), np.int64), "position_ids": np.array([[4]]),
                  **past_s})
    np.testing.assert_allclose(nb["logits"][1], ns["logits"][0], atol=1e-4)
    assert int(np.argmax(nb["logits"][1])) == int(np.argmax(ns["logits"][0]))


def test_manifest_contract(built):
    from runners.manifest import load_manifest

    folder, reports = built
    m = json.loads((folder / "manifest.json").read_text())
    assert {"preset", "checkpoint_sha256", "created", "builder", "engines"} <= set(m)
    assert sorted(m["engines"]) == sorted(PART_NAMES) and m["preset"] == "tiny"
    assert {"torch", "onnx", "onnxruntime", "tensorrt", "device", "cpu_model", "isa"} <= set(m["builder"])
    for name, e in m["engines"].items():
        assert {"file", "backend", "precision", "inputs", "outputs", "sha256", "parity"} <= set(e), name
        assert {"metric", "value", "tolerance", "passed"} <= set(e["parity"]) and e["parity"]["passed"]
        for t in e["inputs"]:
            assert {"name", "dtype", "shape", "min", "opt", "max"} <= set(t)
    assert m["engines"]["llm"]["embed_table"] == "llm.embed_tokens.npy" and "kv_layout" in m["engines"]["llm"]
    load_manifest(folder)
    assert [r.part for r in reports] == list(PART_NAMES)


def test_tampered_or_incomplete_builds_are_refused(built, tmp_path):
    from runners.manifest import ManifestError, load_manifest

    folder, _ = built
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    with open(copy / "pixel_decoder.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ManifestError, match="sha256"):
        load_manifest(copy)
    (copy / "pixel_decoder.onnx").unlink()
    with pytest.raises(ManifestError, match="missing"):
        load_manifest(copy)
    m = json.loads((folder / "manifest.json").read_text())
    m["engines"]["llm"]["parity"]["passed"] = False
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ManifestError, match="parity"):
        load_manifest(copy, verify_files=False)
    with pytest.raises(ManifestError, match="build engines first"):
        load_manifest(tmp_path / "nothing")


def test_parity_failure_names_part_and_tensor(built, tiny_predictor, data_root):
    from export.parity import compare, parity_images, record_chain
    from runners.onnxruntime_runner import OnnxRuntimeRunner

    folder, _ = built
    recordings = record_chain(tiny_predictor, parity_images(data_root)[0], max_new_tokens=1, llm_calls=2)

    class Noisy(OnnxRuntimeRunner):
        def infer(self, feed):
            out = super().infer(feed)
            out["scores"] = out["scores"] + 0.01
            return out

    from export.specs import SPECS

    spec = SPECS["pixel_decoder"](tiny_predictor.config)
    with Noisy("pixel_decoder", folder / "pixel_decoder.onnx", device="cpu") as r:
        result = compare("pixel_decoder", r, recordings["pixel_decoder"], spec, "fp32")
    assert not result.passed and result.worst_tensor == "scores" and result.value == pytest.approx(0.01, abs=1e-4)


def test_engines_chain_equals_pytorch(built, data_root):
    """``egx predict --engines`` gives the PyTorch answer: same tokens, mask IoU >= 0.99."""
    from pycocotools import mask as coco

    folder, _ = built
    args = ["--image", SAR, "--modality", "sar", "--text", "Segment the ship.", "--point", "400,400",
            "--box", "300,300,500,450", "--max-new-tokens", "6", "--json"]
    outs = []
    for src in (["--preset", "tiny"], ["--engines", str(folder), "--device", "cpu"]):
        proc = subprocess.run([sys.executable, "-m", "egx", "predict", *src, *args], cwd=REPO,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        outs.append(json.loads(proc.stdout))
    ref, eng = outs
    assert eng["text"] == ref["text"] and len(eng["masks"]) == len(ref["masks"]) >= 1
    for a, b in zip(ref["masks"], eng["masks"]):
        ma, mb = coco.decode(a).astype(bool), coco.decode(b).astype(bool)
        union = (ma | mb).sum()
        assert union == 0 or (ma & mb).sum() / union >= 0.99
    np.testing.assert_allclose(eng["scores"], ref["scores"], atol=1e-4)


@pytest.mark.parametrize("argv, message", [
    (["--precision", "int8"], "INT8 needs calibration data"),
    (["--backend", "tensorrt"], "TensorRT"),
    (["--backend", "vision_encoder=tensorrt-llm"], "tensorrt-llm builds only the llm"),
    (["--precision", "fp16"], "FP16 is built for TensorRT"),
    (["--max-prompts", "50"], "region tokens"),
    (["--backend", "warp"], "not one of"),
    (["--precision", "head=fp16"], "not a part"),
])
def test_invalid_build_options_are_refused_before_work(argv, message, tmp_path):
    proc = subprocess.run([sys.executable, "export/build_engines.py", "--preset", "tiny", "--out", str(tmp_path / "x"),
                           *argv], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "x").exists()  # nothing was built


def test_bench_writes_the_table_and_json(built, tmp_path):
    folder, _ = built
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "benchmarks/bench.py", "--preset", "tiny", "--engines", str(folder),
                           "--repeats", "2", "--json", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    stages = {"vision_encoder", "prompt_encoder", "llm", "pixel_decoder", "end_to_end_grounding",
              "end_to_end_segmentation", "end_to_end_region", "prefix_cached_segmentation", "click_to_mask",
              "click_to_mask_new_window", "decode_per_token"}
    served = {"zmq_overhead", "click_to_mask", "click_to_mask_new_window", "end_to_end_segmentation",
              "throughput_1_worker", "throughput_1_worker_batch_4", "throughput_2_workers", "throughput_new_images_1_worker",
              "throughput_new_images_staged", "throughput_4_clients"}
    for backend, expected in (("pytorch", stages), ("onnxruntime", stages | {"throughput_in_process"}),
                              ("zmq", served)):
        rows = [r for r in report["rows"] if r["backend"] == backend]
        assert {r["stage"] for r in rows} == expected
        assert all(0 < r["median_ms"] <= r["p95_ms"] for r in rows)
    assert all(t.get("errors", 0) == 0 and t["requests_per_s"] > 0 for t in report["served"].values())
    four = {r["config"]: r["requests_per_s"] for r in report["rows"] if r["stage"] == "throughput_4_clients"}
    assert four == {k: t["requests_per_s"] for k, t in report["served"].items() if k != "in_process"}
    assert report["machine"]["copy_bandwidth_gbs"] > 0
    assert report["machine"]["cpu_model"] and isinstance(report["machine"]["isa"], list)  # INT8 ratios depend on them
    assert 0 < report["decode_vs_bandwidth"]["onnxruntime fp32"]["fraction_of_ceiling"]
    assert report["part_precisions"]["fp32"] == dict.fromkeys(PART_NAMES, "fp32")
    for r in (r for r in report["rows"] if r["stage"] == "end_to_end_segmentation" and r["backend"] != "zmq"):
        where = r["where_ms"]  # the stages of a segmentation request, each timed by the predictor
        assert set(where) == {"preprocess", "vision_encoder", "prompt_encoder", "llm_prefill", "llm_decode",
                              "pixel_decoder", "postprocess", "other"}
        assert where["vision_encoder"] > 0 and where["llm_prefill"] > 0 and where["pixel_decoder"] > 0
        assert sum(where.values()) <= r["p95_ms"] * 1.05
    assert "where the time goes" in proc.stdout
    assert "click_to_mask" in proc.stdout and "speed-up" in proc.stdout and "zmq: overhead" in proc.stdout


def test_failed_parity_fails_the_build_and_is_recorded(tmp_path, data_root, monkeypatch, capsys):
    """A part that disagrees with PyTorch: the build names part and tensor, exits 1, and the
    manifest records the failure (so the runtime refuses it)."""
    import dataclasses

    import export.build
    from export.cli import add_build_arguments, run
    from runners.manifest import ManifestError, load_manifest

    make = SPECS["pixel_decoder"]
    strict = lambda cfg: dataclasses.replace(make(cfg), tolerance={"fp32": -1.0, "fp16": -1.0, "int8": -1.0})  # noqa: E731
    monkeypatch.setitem(export.build.SPECS, "pixel_decoder", strict)
    import argparse

    parser = argparse.ArgumentParser()
    add_build_arguments(parser)
    out = tmp_path / "failing"
    code = run(parser.parse_args(["--preset", "tiny", "--out", str(out), "--data", str(data_root)]))
    captured = capsys.readouterr()
    assert code == 1 and "pixel_decoder" in captured.err and "differs from PyTorch" in captured.err
    m = json.loads((out / "manifest.json").read_text())
    assert m["engines"]["pixel_decoder"]["parity"]["passed"] is False
    assert m["engines"]["vision_encoder"]["parity"]["passed"] is True
    with pytest.raises(ManifestError, match="pixel_decoder failed its parity"):
        load_manifest(out)


@pytest.mark.parametrize("class_names,norm", [((), "group"), (("harbor", "T72", "ZSU-23-4"), "group"),
                                              (("harbor", "T72", "ZSU-23-4"), "batch")])
def test_cnn_vision_encoder_exports_and_matches(tmp_path, class_names, norm):
    """The trained default's vision encoder kind ("cnn": residual CNN + FPN, with and without
    class words, group or batch norm with its running statistics) through ONNX Runtime, at a
    batch other than the export's."""
    import dataclasses

    import onnxruntime as ort

    from earthgptx.config import VisionConfig
    from earthgptx.vision_encoder import VisionEncoder
    from export.onnx_export import export_onnx

    vision = VisionConfig(kind="cnn", image_size=64, patch_size=8, cnn_dims=(8, 16, 32, 32), cnn_depths=(1, 1, 1, 1),
                          token_grid=2, embed_dim=16, class_names=class_names, class_tokens=3, norm=norm)
    cfg = dataclasses.replace(preset("tiny"), vision=vision)
    torch.manual_seed(0)
    module = VisionEncoder(vision, cfg.llm.hidden).eval()
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):  # statistics of a trained model, not the identity
            m.running_mean.normal_(0, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    if class_names:
        module.class_words.normal_()
    path = export_onnx(SPECS["vision_encoder"](cfg), module, tmp_path / "vision_encoder.onnx")
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        ref = module(x)
    out = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"pixel_values": x.numpy()})
    assert out[0].shape == (3, 4 + 3 * bool(class_names), cfg.llm.hidden) and out[1].shape == (3, 16, 8, 8)
    for a, b in zip(out, ref):
        np.testing.assert_allclose(a, b.numpy(), atol=1e-4)
