"""INT8 calibration on real imagery (tiny preset): the calibration set and its robustness
to bad data, Q/DQ and weight-only quantization, and the INT8 build's accuracy gate."""

from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest

from calibration.dataset import CalibrationError, halves
from calibration.listing import discover
from calibration.sampling import choose
from earthgptx.config import PART_NAMES


def test_shared_data_set_is_stratified_deterministic_and_disjoint(data_root):
    a, b, c = choose(data_root, seed=0), choose(data_root, seed=0), choose(data_root, seed=1)
    assert a.sha256 == b.sha256 and a.sha256 != c.sha256
    cal = {i.key for i in a.calibration}
    assert not cal & {i.key for i in a.evaluation}  # evaluation images are never calibration images
    s = a.summary()
    assert s["evaluation_images"] == {"optical": 30, "sar": 30, "infrared": 30} and s["notes"] == {}
    assert s["calibration_images"] == {"optical": 8, "sar": 8, "infrared": 8}
    ev = s["evaluation_breakdown"]
    # every dataset found is in the evaluation, in equal shares where it has the images
    assert ev["optical"]["datasets"] == {"aid": 15, "dota": 1, "road-mini": 14}
    assert ev["sar"]["datasets"] == {"hrsid": 3, "hrsid-mini": 14, "mstar": 13}
    assert ev["infrared"]["datasets"] == {"sirst": 15, "sirst-v2": 15}
    assert {"small", "large", "none"} <= set(ev["optical"]["sizes"]) and ev["infrared"]["sizes"]["small"] >= 10


def test_a_modality_with_one_image_is_split_into_halves(data_root, tmp_path):
    import shutil

    dota = tmp_path / "optical" / "dota"
    shutil.copytree(data_root / "optical" / "dota", dota)
    a = choose(tmp_path, seed=0)
    optical = a.calibration + a.evaluation
    assert len(optical) == 2 and all(i.crop for i in optical)  # one image: split into halves
    x = sorted(i.crop for i in optical)
    assert x[0][2] <= x[1][0]  # the halves do not overlap


def test_halves_keep_only_objects_inside(data_root):
    items, _ = discover(data_root / "optical" / "dota")
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
    summary = choose(tmp_path / "set").summary()  # 4 sar candidates: a quarter calibrates, the rest evaluates
    assert summary["calibration_images"]["sar"] == 1 and summary["evaluation_images"]["sar"] == 2


def test_empty_or_too_small_calibration_sets_are_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CalibrationError, match="no usable calibration image"):
        choose(tmp_path / "empty")
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
    b = run_on_cpu(tmp_path / "v.int8.onnx", feeds[0])
    for x, y in zip(a, b):
        assert float(x.ravel() @ y.ravel() / np.linalg.norm(x) / np.linalg.norm(y)) > 0.98


def run_on_cpu(path, feed: dict) -> list:
    """Outputs of the ONNX file at ``path`` as the project runs it on this CPU
    (``OnnxRuntimeRunner``: uint8 activations, and uint8 weights where u8 x s8 kernels
    saturate), in the file's output order."""
    from runners.onnxruntime_runner import OnnxRuntimeRunner

    runner = OnnxRuntimeRunner("test", path, device="cpu")
    out = runner.infer(feed)
    return [out[name] for name in runner.output_names]


@pytest.fixture(scope="module")
def tiny_vision(tiny, tmp_path_factory):
    """The tiny vision encoder in ONNX, 12 calibration feeds and 3 held-out ones (random, at three
    scales, so that later chunks widen the histograms of earlier ones)."""
    from export.onnx_export import export_onnx
    from export.specs import SPECS

    model = tiny[0]
    src = export_onnx(SPECS["vision_encoder"](model.config), model.vision_encoder,
                      tmp_path_factory.mktemp("vision") / "v.onnx")
    rng = np.random.default_rng(1)
    feeds = [{"pixel_values": (rng.normal(size=(1, 3, 128, 128)) * s).astype(np.float32)} for s in (0.5, 1, 2) * 4]
    held_out = [{"pixel_values": (rng.normal(size=(1, 3, 128, 128)) * s).astype(np.float32)} for s in (0.5, 1, 2)]
    return src, feeds, held_out


@pytest.mark.parametrize("method", ["max", "entropy", "percentile"])
def test_every_calibration_method_is_fed_in_chunks_and_stays_close_to_fp32(tiny_vision, tmp_path, method,
                                                                          monkeypatch):
    """The calibrators see ``chunk`` feeds at a time (bounded memory), and the Q/DQ model
    agrees with FP32 on held-out inputs, and with the one made from all feeds in one pass."""
    from export import quantize

    src, feeds, held_out = tiny_vision
    ranges = []
    original = quantize.FeedReader.set_range

    def recording(self, start_index, end_index):
        ranges.append((start_index, end_index))
        original(self, start_index, end_index)

    monkeypatch.setattr(quantize.FeedReader, "set_range", recording)
    info = quantize.quantize_qdq(src, tmp_path / "chunked.onnx", feeds, method, chunk=5)
    assert info["calibration_chunk"] == 4 and ranges == [(0, 4), (4, 8), (8, 12)]  # 4: largest divisor of 12 <= 5
    quantize.quantize_qdq(src, tmp_path / "one_pass.onnx", feeds, method, chunk=len(feeds))
    paths = {"fp32": src, "chunked": tmp_path / "chunked.onnx", "one_pass": tmp_path / "one_pass.onnx"}
    cos = lambda x, y: float(x.ravel() @ y.ravel() / np.linalg.norm(x) / np.linalg.norm(y))  # noqa: E731
    for feed in held_out:
        ref, chunked, one_pass = (run_on_cpu(paths[k], feed) for k in ("fp32", "chunked", "one_pass"))
        for r, c, o in zip(ref, chunked, one_pass):
            assert cos(r, c) > 0.99 and cos(c, o) > 0.99


def test_calibration_chunks_divide_the_feeds_and_hold_one_shape_each():
    from earthgptx.errors import EarthGPTXError
    from export.quantize import chunk_size

    same = lambda n: [{"x": np.zeros((1, 3))}] * n  # noqa: E731
    assert [chunk_size(same(n), 4) for n in (36, 35, 37, 3, 1)] == [4, 1, 1, 3, 1]
    ragged = [{"x": np.zeros((1, r))} for r in (1, 1, 2, 2, 3, 3)]
    assert chunk_size(ragged, 4) == 2 and chunk_size(ragged[1:] + ragged[:1], 4) == 1
    with pytest.raises(EarthGPTXError, match="at least 1"):
        chunk_size(same(10), 0)


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_histogram_calibration_takes_feeds_of_different_shapes(tiny, tmp_path, method):
    """The prompt encoder's feeds differ in their number of prompts: each chunk must hold
    one shape (ORT stacks a chunk), and the model still agrees with FP32."""
    import onnxruntime as ort
    import torch

    from export.onnx_export import export_onnx
    from export.quantize import quantize_qdq
    from export.specs import SPECS

    model = tiny[0]
    spec = SPECS["prompt_encoder"](model.config)
    src = export_onnx(spec, model.prompt_encoder, tmp_path / "p.onnx")
    feeds = []
    for k, regions in enumerate((1, 2, 3, 2, 3, 1)):
        ex = spec.example_inputs({"batch": 1, "regions": regions}, seed=k)
        ex["prompt_types"] = torch.arange(regions)[None] % 3  # point, box, free-form
        feeds.append({n: v.numpy() for n, v in ex.items()})
    info = quantize_qdq(src, tmp_path / "p.int8.onnx", feeds, method, chunk=2)
    assert info["calibration_chunk"] == 1  # no chunk of two holds one shape here
    a = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, feeds[1])[0]
    b = run_on_cpu(tmp_path / "p.int8.onnx", feeds[1])[0]
    assert float(a.ravel() @ b.ravel() / np.linalg.norm(a) / np.linalg.norm(b)) > 0.98


def test_balanced_feeds_take_turns_per_modality():
    from calibration.feeds import balanced

    out = balanced({"optical": [1], "sar": [2, 3], "infrared": [4, 5, 6], "empty": []})
    assert out == [1, 2, 4, 1, 3, 5, 1, 2, 6]


@pytest.fixture(scope="module")
def calibration_root(tmp_path_factory, data_root):
    """The three annotated sets with masks of every modality (SIRST, HRSID, DOTA): a small
    folder for the builds that test something other than the sampling of a big one."""
    import shutil

    root = tmp_path_factory.mktemp("calibration")
    for folder in ("infrared/sirst", "sar/hrsid", "optical/dota"):
        shutil.copytree(data_root / folder, root / folder)
    return root


@pytest.fixture(scope="module")
def int8_build(tmp_path_factory, data_root):
    """The tiny INT8 build over the whole shared folder (thousands of images), as issue #13 asks."""
    from export.build import BuildOptions, per_part, run_build
    from runners.manifest import PRECISIONS

    out = tmp_path_factory.mktemp("int8") / "tiny-int8"
    opts = BuildOptions(preset="tiny", out=out, data_root=data_root, calibration=data_root,
                        precisions=per_part(["int8"], PRECISIONS, "fp32", "precision"))
    return out, run_build(opts)


def test_int8_build_records_accuracy_and_falls_back_honestly(int8_build):
    from runners.manifest import load_manifest

    out, reports = int8_build
    m = load_manifest(out)
    acc = m["accuracy"]
    gate = acc["gate"]
    assert acc["passed"] is True  # after any fallback, what was kept meets the gate
    assert set(acc["per_modality"]) == {"optical", "sar", "infrared"}
    cal = acc["calibration"]
    assert cal["evaluation_images"] == {"optical": 30, "sar": 30, "infrared": 30} and cal["notes"] == {}
    assert not set(cal["images"]["calibration"]) & set(cal["images"]["evaluation"])
    for mod, r in acc["per_modality"].items():
        assert r["images"] == 30
        # the report's groups add up: every request is in one dataset and one size bucket
        assert sum(g["images"] for g in r["per_dataset"].values()) == 30
        assert sum(g["requests"] for g in r["per_dataset"].values()) == r["requests"]
        assert sum(g["requests"] for g in r["per_size"].values()) == r["requests"]
        assert set(r["per_dataset"]) == set(cal["evaluation_breakdown"][mod]["datasets"])
        for key in ("mask_iou", "box_iou"):
            s = r[key]
            assert s["n"] >= 30 and s["worst"] <= s["p5"] <= 1.0 and s["worst"] <= s["mean"] <= 1.0
            assert s["mean"] >= gate[key] and s["p5"] >= gate["p5"]
    for part in PART_NAMES:
        e, d = m["engines"][part], acc["decisions"][part]
        assert e["precision"] == d["precision"] == ("int8" if part in acc["int8_parts"] else "fp32")
        assert "int8_vs_fp32" in e and 0 < e["int8_vs_fp32"]["cosine"] <= 1.0 + 1e-9
        assert "int8_parity" in e and e["parity"]["passed"]
        if part in acc["fallback"]:
            assert e["fallback"]["reason"] == acc["fallback"][part] == d["reason"] and e["file"] == f"{part}.onnx"
            assert d["reason"].startswith(("parity:", "gate"))
        else:
            assert e["file"] == f"{part}.int8.onnx" and e["int8_parity"]["passed"]
    llm = m["engines"]["llm"]
    assert llm["quantization"]["form"] in ("dynamic", "weight-only")  # the faster form first, then the other
    if llm["quantization"]["form"] == "weight-only":
        assert llm["first_form"]["quantization"]["form"] == "dynamic"
    assert not (out / "int8-forms").exists() and (out / "llm.int8.onnx.data").is_file()
    feeds = np.load(out / "calibration" / "vision_encoder.npz")
    assert any(k.endswith("/pixel_values") for k in feeds.files)
    assert {str(feeds[k]) for k in feeds.files if k.endswith("/__modality__")} == {"optical", "sar", "infrared"}


def test_int8_build_with_histogram_calibration(tmp_path, data_root, calibration_root):
    """``--calibration-method percentile`` through the whole build: every Q/DQ part (feeds of
    varying shapes included) is calibrated in chunks and the kept parts meet the gate."""
    from export.build import BuildOptions, per_part, run_build
    from runners.manifest import PRECISIONS
    from runners.manifest import load_manifest

    out = tmp_path / "tiny-int8-pct"
    run_build(BuildOptions(preset="tiny", out=out, data_root=data_root, calibration=calibration_root,
                           calibration_method="percentile", evaluation_images=4,
                           precisions=per_part(["int8"], PRECISIONS, "fp32", "precision")))
    m = load_manifest(out)
    assert m["accuracy"]["passed"] is True
    for part in ("vision_encoder", "prompt_encoder", "pixel_decoder"):
        q = m["engines"][part]["quantization"]
        assert q["method"].endswith("(percentile)") and 1 <= q["calibration_chunk"] <= 2


def test_int8_engines_run_the_chain(int8_build, data_root):
    from earthgptx.generation import GenerationConfig
    from earthgptx.imageio import read_image
    from earthgptx.processing import VisualPrompts
    from runners.engines import open_predictor

    out, _ = int8_build
    p = open_predictor(out, device="cpu")
    img = read_image(data_root / "sar/hrsid/P0094_0_800_3000_3800.png").data
    r = p.predict(img, "sar", "Segment the ship.", VisualPrompts([(400, 400)], [], []),
                  generation=GenerationConfig(max_new_tokens=3))
    assert r.masks and r.masks[0].shape == (800, 800)


def _voc_xml(w: int, h: int, boxes: list[tuple], name: str = "ship") -> str:
    """A Pascal-VOC file: ``boxes`` as 1-based inclusive (xmin, ymin, xmax, ymax)."""
    objects = "".join(f"<object><name>{name}</name><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
                      f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>" for b in boxes)
    return f"<annotation><size><width>{w}</width><height>{h}</height><depth>3</depth></size>{objects}</annotation>"


def test_voc_only_folder_gives_items_with_prompts_inside_the_boxes(tmp_path):
    from calibration.dataset import requests

    rng = np.random.default_rng(0)
    optical = tmp_path / "set" / "optical"
    (optical / "JPEGImages").mkdir(parents=True)
    (optical / "Annotations").mkdir()
    voc = {"a": [(11, 21, 40, 50)], "b": [(1, 1, 30, 20), (61, 41, 96, 64)]}
    for stem, boxes in voc.items():
        cv2.imwrite(str(optical / "JPEGImages" / f"{stem}.png"), (rng.random((64, 96, 3)) * 255).astype(np.uint8))
        (optical / "Annotations" / f"{stem}.xml").write_text(_voc_xml(96, 64, boxes))
    cv2.imwrite(str(optical / "c.png"), (rng.random((64, 96, 3)) * 255).astype(np.uint8))  # xml beside the image
    (optical / "c.xml").write_text(_voc_xml(96, 64, [(5, 5, 20, 30)]))
    items, skipped = discover(tmp_path / "set")
    assert skipped == [] and len(items) == 3 and all(i.modality == "optical" and not i.masks for i in items)
    by_stem = {i.path.stem: i for i in items}
    np.testing.assert_array_equal(by_stem["a"].boxes, [[10, 20, 40, 50]])  # 1-based inclusive -> 0-based edges
    np.testing.assert_array_equal(by_stem["b"].boxes, [[0, 0, 30, 20], [60, 40, 96, 64]])
    for item in items:
        for text, prompts, task in requests(item, 6):
            for x, y in prompts.points:
                assert any(b[0] <= x <= b[2] and b[1] <= y <= b[3] for b in item.boxes), (item.path, x, y)
            for box in prompts.boxes:
                assert any(np.allclose(box, b) for b in item.boxes)
    summary = choose(tmp_path / "set").summary()
    assert summary["calibration_images"]["optical"] == 1 and summary["evaluation_images"]["optical"] == 2


def test_bad_voc_xml_is_reported_and_skipped(tmp_path):
    sar = tmp_path / "set" / "sar"
    sar.mkdir(parents=True)
    grey = (np.random.default_rng(0).random((64, 80)) * 255).astype(np.uint8)
    xml = {"ok": _voc_xml(80, 64, [(10, 10, 20, 20)]),
           "unclosed": "<annotation><object><bndbox><xmin>1</xmin>",
           "words": _voc_xml(80, 64, [("left", 1, 9, 9)]),
           "reversed": _voc_xml(80, 64, [(30, 10, 20, 20)]),
           "no_bndbox": "<annotation><object><name>ship</name></object></annotation>",
           "not_voc": "<labels><box/></labels>",
           "resized": _voc_xml(160, 128, [(10, 10, 20, 20)]),
           "one_out": _voc_xml(80, 64, [(10, 10, 20, 20), (70, 50, 120, 64)]),
           "all_out": _voc_xml(80, 64, [(100, 10, 120, 20)]),
           "zero_based": _voc_xml(80, 64, [(0, 0, 10, 10)])}  # off by one: within tolerance, clipped
    for stem, text in xml.items():
        cv2.imwrite(str(sar / f"{stem}.png"), grey)
        (sar / f"{stem}.xml").write_text(text)
    items, skipped = discover(tmp_path / "set")
    assert sorted(i.path.stem for i in items) == ["ok", "one_out", "zero_based"]
    by_stem = {i.path.stem: i for i in items}
    np.testing.assert_array_equal(by_stem["one_out"].boxes, [[9, 9, 20, 20]])  # the box outside was dropped
    np.testing.assert_array_equal(by_stem["zero_based"].boxes, [[0, 0, 10, 10]])
    reasons = {}
    for path, why in skipped:
        reasons.setdefault(Path(path).stem, []).append(why)
    assert set(reasons) == {"unclosed", "words", "reversed", "no_bndbox", "not_voc", "resized", "one_out", "all_out"}
    assert "not readable Pascal-VOC xml" in reasons["unclosed"][0]
    assert "numeric" in reasons["words"][0] and "xmax < xmin" in reasons["reversed"][0]
    assert "no <bndbox>" in reasons["no_bndbox"][0] and "<annotation>" in reasons["not_voc"][0]
    assert "says 160x128 but the image is 80x64" in reasons["resized"][0]
    assert "outside the 80x64 image" in reasons["one_out"][0]
    assert any("no box" in why for why in reasons["all_out"])


def test_sirst_voc_boxes_agree_with_its_masks(data_root):
    """SIRST draws one VOC box per image round all its targets: it matches the box enclosing
    the mask to a pixel per edge (its writers mix 0- and 1-based indices)."""
    from earthgptx.data.readers import read_voc, voc_mask_disagreement
    from earthgptx.imageio import read_mask
    from earthgptx.processing import mask_box

    sirst = data_root / "infrared" / "sirst"
    ious, sides, n = [], [], 0
    for xml in sorted((sirst / "masks").glob("*.xml")):
        mask = read_mask(sirst / "masks" / f"{xml.stem}_pixels0.png")
        voc = read_voc(xml)
        assert voc.size == (mask.shape[1], mask.shape[0]) and len(voc.boxes) == 1, xml
        a, b = voc.boxes[0], np.asarray(mask_box(mask))
        assert np.abs(a - b).max() <= 1, xml
        n_obj, labels = cv2.connectedComponents(mask.astype(np.uint8))
        parts = np.asarray([mask_box(labels == i) for i in range(1, n_obj)])
        assert voc_mask_disagreement(voc.boxes, parts) is None, xml
        inter = np.prod(np.clip(np.minimum(a[2:], b[2:]) - np.maximum(a[:2], b[:2]), 0, None))
        ious.append(inter / (np.prod(a[2:] - a[:2]) + np.prod(b[2:] - b[:2]) - inter))
        sides.append(min(b[2] - b[0], b[3] - b[1]))
        n += 1
    ious, sides = np.asarray(ious), np.asarray(sides)
    assert n == 427 and np.median(ious) >= 0.8  # targets of 2-5 px: one pixel is much of the IoU
    assert ious[sides >= 10].min() >= 0.7 and ious[sides >= 20].min() >= 0.9
    items, skipped = discover(sirst)
    assert len(items) == 426 and not any("disagree" in why for _, why in skipped)
    assert all(len(i.masks) == len(i.boxes) >= 1 for i in items)  # masks are preferred: free-form prompts


def test_sirst_xml_without_mask_and_disagreeing_xml(data_root, tmp_path):
    import re
    import shutil

    src = data_root / "infrared" / "sirst"
    dst = tmp_path / "infrared" / "sirst"
    (dst / "images").mkdir(parents=True)
    (dst / "masks").mkdir()
    for stem in ("Misc_1", "Misc_2", "Misc_3", "Misc_111"):
        shutil.copy(src / "images" / f"{stem}.png", dst / "images")
        shutil.copy(src / "masks" / f"{stem}.xml", dst / "masks")
    shutil.copy(src / "masks" / "Misc_2_pixels0.png", dst / "masks")  # Misc_1, Misc_3, Misc_111: xml only
    shutil.copy(src / "masks" / "Misc_3_pixels0.png", dst / "masks")
    xml = (dst / "masks" / "Misc_3.xml").read_text()
    (dst / "masks" / "Misc_3.xml").write_text(re.sub(r"<xmin>\d+</xmin>", "<xmin>1</xmin>", xml))  # far from its mask
    items, skipped = discover(tmp_path / "infrared")
    by_stem = {i.path.stem: i for i in items}
    assert sorted(by_stem) == ["Misc_1", "Misc_2"]
    np.testing.assert_array_equal(by_stem["Misc_1"].boxes, [[70, 74, 221, 134]])  # from the xml, no mask
    assert not by_stem["Misc_1"].masks and len(by_stem["Misc_2"].masks) >= 1
    reasons = " | ".join(f"{Path(p).name}: {why}" for p, why in skipped)
    assert "Misc_111.xml: xml <size> says 592x400 but the image is 325x220" in reasons
    assert "Misc_3.png: Misc_3.xml and Misc_3_pixels0.png disagree" in reasons


@pytest.fixture(scope="module")
def tiny_llm(tiny, tmp_path_factory):
    """The tiny LLM in ONNX and a prefill feed of 24 tokens (no past)."""
    from export.onnx_export import export_onnx
    from export.specs import SPECS

    model = tiny[0]
    spec = SPECS["llm"](model.config)
    src = export_onnx(spec, model.llm, tmp_path_factory.mktemp("llm") / "llm.onnx")
    feed = {k: v.numpy() for k, v in spec.example_inputs({"batch": 1, "seq": 24, "past": 0, "total": 24}).items()}
    return src, feed


def test_lm_head_gemm_becomes_the_same_matmul(tiny_llm, tmp_path):
    import onnxruntime as ort

    from export.quantize import gemm_as_matmul

    src, feed = tiny_llm
    model = onnx.load(str(src))
    gemms = sum(n.op_type == "Gemm" for n in model.graph.node)
    assert gemms >= 1 and gemm_as_matmul(model) == gemms  # the LM head
    assert not any(n.op_type == "Gemm" for n in model.graph.node)
    onnx.save(model, str(tmp_path / "m.onnx"))
    a = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, feed)
    b = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]).run(None, feed)
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("form", ["dynamic", "weight-only"])
def test_llm_int8_forms_quantize_every_linear_layer_and_stay_close(tiny_llm, tmp_path, form):
    """Both LLM forms leave no FP32 MatMul with a constant weight (the LM head included); the
    dynamic one runs integer MatMuls except in ``down_proj`` and the head; both agree with FP32."""
    import onnxruntime as ort

    from export.quantize import quantize_llm

    src, feed = tiny_llm
    info = quantize_llm(src, tmp_path / "llm.int8.onnx", form)
    q = onnx.load(str(tmp_path / "llm.int8.onnx"))
    weights = {i.name for i in q.graph.initializer}
    assert not [n.name for n in q.graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in weights]
    fp32 = onnx.load(str(src), load_external_data=False)
    layers = sum(1 for n in fp32.graph.node if n.op_type == "MatMul") - 2 * model_layers(fp32) + 1  # + the head
    ops = [n.op_type for n in q.graph.node]
    assert info["form"] == form
    if form == "dynamic":
        assert ops.count("MatMulNBits") == model_layers(fp32) + 1  # every down_proj and the head
        assert ops.count("MatMulInteger") == layers - ops.count("MatMulNBits")
    else:
        assert "MatMulInteger" not in ops and ops.count("MatMulNBits") == layers
    a = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, feed)
    b = run_on_cpu(tmp_path / "llm.int8.onnx", feed)
    for x, y in zip(a, b):
        assert float(x.ravel() @ y.ravel() / np.linalg.norm(x) / np.linalg.norm(y)) > 0.99


def model_layers(model) -> int:
    """Decoder layers of an exported LLM: one ``Softmax`` each."""
    return sum(1 for n in model.graph.node if n.op_type == "Softmax")
