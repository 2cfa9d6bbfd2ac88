"""INT8 calibration on real imagery (tiny preset): the calibration set and its robustness
to bad data, Q/DQ and weight-only quantization, and the INT8 build's accuracy gate."""

import cv2
import numpy as np
import onnx
import pytest

from calibration.dataset import CalibrationError, discover, halves, select
from earthgptx.config import PART_NAMES


def test_shared_data_set_is_balanced_deterministic_and_disjoint(data_root):
    items, skipped = discover(data_root)
    assert {i.modality for i in items} == {"optical", "sar", "infrared"}
    assert any("Misc_111" in p and "mask is" in why for p, why in skipped)  # reported, not fatal
    a, b, c = select(items, skipped, seed=0), select(items, skipped, seed=0), select(items, skipped, seed=1)
    assert a.sha256 == b.sha256 and a.sha256 != c.sha256
    cal = {(i.key) for i in a.calibration}
    assert not cal & {i.key for i in a.evaluation}  # evaluation images are never calibration images
    assert {i.modality for i in a.evaluation} == {"optical", "sar", "infrared"}
    optical = [i for i in a.calibration + a.evaluation if i.modality == "optical"]
    assert len(optical) == 2 and all(i.crop for i in optical)  # one image: split into halves
    x = sorted(i.crop for i in optical)
    assert x[0][2] <= x[1][0]  # the halves do not overlap


def test_halves_keep_only_objects_inside(data_root):
    items, _ = discover(data_root / "optical")
    left, right = halves(items[0])
    w = left.crop[2]
    assert all(b[2] <= w for b in left.boxes) and len(left.boxes) + len(right.boxes) <= len(items[0].boxes)
    assert all(m.shape == left.image().shape[:2] for m in left.masks)


def test_bad_calibration_data_is_reported_and_skipped(tmp_path):
    sar = tmp_path / "set" / "sar"
    sar.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(3):
        cv2.imwrite(str(sar / f"ok{i}.png"), (rng.random((64, 80)) * 255).astype(np.uint8))
    (sar / "broken.png").write_bytes(b"not an image")
    (tmp_path / "set" / "optical").mkdir()
    grey = (rng.random((32, 32)) * 255).astype(np.uint8)
    cv2.imwrite(str(tmp_path / "set" / "optical" / "grey.png"), grey)  # one band tagged optical: wrong modality
    (tmp_path / "set" / "misc").mkdir()
    cv2.imwrite(str(tmp_path / "set" / "misc" / "where.png"), grey)  # no modality in its path
    items, skipped = discover(tmp_path / "set")
    assert len(items) == 3 and all(i.modality == "sar" for i in items)
    reasons = " | ".join(why for _, why in skipped)
    assert "cannot read" in reasons and "needs 3 bands" in reasons and "modality unknown" in reasons
    assert select(items, skipped).summary()["calibration_images"]["sar"] == 2


def test_empty_or_too_small_calibration_sets_are_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    items, skipped = discover(tmp_path / "empty")
    with pytest.raises(CalibrationError, match="no usable calibration image"):
        select(items, skipped)
    with pytest.raises(CalibrationError, match="not found"):
        discover(tmp_path / "missing")


def test_qdq_quantization_is_symmetric_and_keeps_act_matmuls_float(tiny, tmp_path):
    import onnxruntime as ort

    from export.fp16 import activation_pairs
    from export.onnx_export import export_onnx
    from export.quantize import quantize_qdq
    from export.specs import SPECS

    model = tiny[0]
    spec = SPECS["vision_encoder"](model.config)
    src = export_onnx(spec, model.vision_encoder, tmp_path / "v.onnx")
    rng = np.random.default_rng(0)
    feeds = [{"pixel_values": rng.normal(size=(1, 3, 128, 128)).astype(np.float32)} for _ in range(4)]
    info = quantize_qdq(src, tmp_path / "v.int8.onnx", feeds, "max")
    q = onnx.load(str(tmp_path / "v.int8.onnx"))
    assert info["quantize_nodes"] > 0
    inits = {i.name: i for i in q.graph.initializer}
    for n in q.graph.node:  # zero points are 0: TensorRT takes only symmetric INT8
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2 and n.input[2] in inits:
            assert not onnx.numpy_helper.to_array(inits[n.input[2]]).any()
    producers = {o: n for n in q.graph.node for o in n.output}
    excluded = set(activation_pairs(onnx.load(str(src))))
    for n in q.graph.node:
        if n.name in excluded and n.op_type == "MatMul":
            assert not all(producers.get(i) is not None and producers[i].op_type == "DequantizeLinear" for i in n.input)
        if n.op_type in ("LayerNormalization", "Softmax"):
            assert producers.get(n.input[0]) is None or producers[n.input[0]].op_type != "DequantizeLinear"
    a = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, feeds[0])
    b = ort.InferenceSession(str(tmp_path / "v.int8.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds[0])
    for x, y in zip(a, b):
        assert float(x.ravel() @ y.ravel() / np.linalg.norm(x) / np.linalg.norm(y)) > 0.98


@pytest.fixture(scope="module")
def int8_build(tmp_path_factory, data_root):
    from export.build import BuildOptions, per_part, PRECISIONS, run_build

    out = tmp_path_factory.mktemp("int8") / "tiny-int8"
    opts = BuildOptions(preset="tiny", out=out, data_root=data_root, calibration=data_root,
                        precisions=per_part(["int8"], PRECISIONS, "fp32", "precision"))
    return out, run_build(opts)


def test_int8_build_records_accuracy_and_falls_back_honestly(int8_build):
    from runtime.manifest import load_manifest

    out, reports = int8_build
    m = load_manifest(out)
    acc = m["accuracy"]
    assert acc["passed"] is True  # after any fallback, what was kept meets the gate
    assert set(acc["per_modality"]) == {"optical", "sar", "infrared"}
    for mod, r in acc["per_modality"].items():
        assert r["images"] >= 1 and (r["mask_iou"] is None or r["mask_iou"] >= acc["gate"]["mask_iou"])
    assert acc["calibration"]["skipped"] >= 1 and len(acc["calibration"]["sha256"]) == 64
    for part in PART_NAMES:
        e = m["engines"][part]
        assert e["precision"] == ("int8" if part in acc["int8_parts"] else "fp32")
        assert "int8_vs_fp32" in e and 0 < e["int8_vs_fp32"]["cosine"] <= 1.0 + 1e-9
        if part in acc["fallback"]:
            assert e["fallback"]["reason"] and e["file"] == f"{part}.onnx"
        else:
            assert e["file"] == f"{part}.int8.onnx"
    assert "weight-only" in m["engines"]["llm"]["quantization"]["method"]
    feeds = np.load(out / "calibration" / "vision_encoder.npz")
    assert any(k.endswith("/pixel_values") for k in feeds.files)
    assert {str(feeds[k]) for k in feeds.files if k.endswith("/__modality__")} == {"optical", "sar", "infrared"}


def test_int8_engines_run_the_chain(int8_build, data_root):
    from earthgptx.generation import GenerationConfig
    from earthgptx.imageio import read_image
    from earthgptx.processing import VisualPrompts
    from runtime.engines import open_predictor

    out, _ = int8_build
    p = open_predictor(out, device="cpu")
    img = read_image(data_root / "sar/hrsid/P0094_0_800_3000_3800.png").data
    r = p.predict(img, "sar", "Segment the ship.", VisualPrompts([(400, 400)], [], []),
                  generation=GenerationConfig(max_new_tokens=3))
    assert r.masks and r.masks[0].shape == (800, 800)
