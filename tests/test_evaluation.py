"""egx eval: metrics against known values, the degenerate cases, and the whole evaluation on a
handful of real images with a predictor whose answers are known (the ground truth, or nothing)."""
import itertools
import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from earthgptx.data import templates as T
from earthgptx.data.readers import dataset_samples
from earthgptx.evaluation import metrics as M
from earthgptx.evaluation.run import EvalOptions, evaluate
from earthgptx.predictor import Prediction
from earthgptx.processing import component_boxes


def test_class_in_text():
    classes = ["T62", "T72", "ZSU-23-4", "dense residential", "medium residential"]
    assert M.class_in_text("It is a T72.", classes) == "T72"
    assert M.class_in_text("zsu_23_4", classes) == "ZSU-23-4"
    assert M.class_in_text("DenseResidential", classes) == "dense residential"
    assert M.class_in_text("a forest", classes) is None


def test_mask_metrics_and_degenerate_cases():
    a = np.zeros((10, 10), bool)
    assert M.mask_iou(a, a) == (0, 0, 1.0)  # two empty masks agree
    b = a.copy()
    b[:2, :5] = True
    assert M.mask_iou(a, b) == (0, 10, 0.0)
    c = a.copy()
    c[:2, :] = True
    assert M.mask_iou(b, c)[2] == pytest.approx(0.5)


def test_target_detection_as_sirst_papers():
    truth = [np.zeros((50, 50), bool) for _ in range(2)]
    truth[0][10:13, 10:13] = True
    truth[1][40:42, 40:42] = True
    pred = np.zeros((50, 50), bool)
    pred[10:14, 10:14] = True  # centroid 1 px from target 0: detected
    pred[25:27, 25:27] = True  # nowhere near a target: 4 false-alarm pixels
    assert M.target_detection(pred, truth) == (1, 2, 4)


def test_box_matching():
    true = np.array([[0, 0, 10, 10], [20, 20, 30, 30]], float)
    pred = np.array([[0, 0, 10, 9], [50, 50, 60, 60], [21, 21, 30, 30]], float)
    assert M.match_boxes(pred, true) == 2
    assert M.match_boxes(np.zeros((0, 4)), true) == 0
    assert M.box_iou(true, true).diagonal().tolist() == [1.0, 1.0]


def test_bleu4_known_values():
    refs = [["a large airport with many planes", "many planes near a terminal"]]
    assert M.bleu4(["a large airport with many planes"], refs) == pytest.approx(1.0)
    assert M.bleu4(["green trees"], refs) < 0.05


class OraclePredictor:
    """Answers with the ground truth of the sample whose image it is given (or nothing)."""

    def __init__(self, samples, right=True):
        self.by_pixel_sum = {}
        self.right = right
        from earthgptx.imageio import read_image

        for s in samples:
            self.by_pixel_sum[int(np.asarray(read_image(s.image).data, dtype=np.int64).sum())] = s

    def predict(self, image, modality, text, prompts=None, task="auto", generation=None, **_):
        s = self.by_pixel_sum[int(np.asarray(image, dtype=np.int64).sum())]
        h, w = image.shape[:2]
        union = np.logical_or.reduce(s.masks) if s.masks else np.zeros((h, w), bool)
        if not self.right:
            union = np.zeros((h, w), bool)
        out = dict(text="", task=task, boxes=np.zeros((0, 4)), boxes_normalized=np.zeros((0, 4)), box_sources=[],
                   masks=[], scores=[], timings_ms={})
        if task == "classify":
            out["text"] = T.readable_class(s.label) if self.right else "nothing"
        elif task == "caption":
            out["text"] = T.clean_caption(s.captions[0]) if self.right else "nothing"
        elif task == "segment":
            out["masks"] = [union]
        elif task == "grounding":
            out["boxes"] = component_boxes(union)
            out["box_sources"] = ["pixel_decoder"] * len(out["boxes"])
        elif task == "click":
            x, y = prompts.points[0]
            hit = [m for m in s.masks if m[int(y), int(x)]]
            out["masks"] = [hit[0] if hit and self.right else np.zeros((h, w), bool)]
        return Prediction(**out)


def test_evaluate_scores_known_answers(data_root):
    picks = {"aid": 2, "mstar": 2, "sirst": 2, "hrsid-mini": 1}
    samples = [s for name, n in picks.items() for s in itertools.islice(dataset_samples(data_root, (name,)), n)]
    right = evaluate(OraclePredictor(samples), samples, EvalOptions(), samples, progress=False)
    rows = {(r["task"], r["dataset"]): r for r in right["rows"]}
    assert rows[("classify", "aid")]["accuracy"] == 1.0 and rows[("classify", "mstar")]["accuracy"] == 1.0
    assert rows[("caption", "aid")]["bleu4"] > 0.6  # one of the references itself
    seg = rows[("segment", "sirst")]
    assert seg["ciou"] == 1.0 and seg["miou"] == 1.0 and seg["pd"] == 1.0 and seg["fa"] == 0.0
    assert rows[("click", "sirst")]["miou"] == 1.0
    assert rows[("grounding", "sirst")]["recall"] == 1.0
    wrong = evaluate(OraclePredictor(samples, right=False), samples, EvalOptions(), samples, progress=False)
    rows = {(r["task"], r["dataset"]): r for r in wrong["rows"]}
    assert rows[("classify", "aid")]["accuracy"] == 0.0
    assert rows[("segment", "sirst")]["ciou"] == 0.0 and rows[("segment", "sirst")]["pd"] == 0.0
    assert rows[("grounding", "hrsid-mini")]["recall"] == 0.0
    base = {(r["task"], r["dataset"]): r for r in right["baseline"]}
    assert base[("segment", "sirst")]["ciou"] == 0.0  # a mask of nothing


def test_egx_eval_command(tmp_path, data_root):
    out = tmp_path / "eval.json"
    r = subprocess.run([sys.executable, "-m", "egx", "eval", "--preset", "tiny", "--data", str(data_root),
                        "--dataset", "sirst", "--dataset", "mstar", "--limit", "1", "--json", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads(out.read_text())
    tasks = {(row["task"], row["dataset"]) for row in report["rows"]}
    assert {("classify", "mstar"), ("segment", "sirst"), ("click", "sirst")} <= tasks
    assert "segment" in r.stdout and report["images"] == 2
