"""Agreement metrics in their degenerate cases, and the per-output comparison a spec declares."""
import numpy as np
import pytest

from export.metrics import (box_disagreement, box_iou, box_set_iou, cosine_distance, mask_iou, max_abs,
                            summarize)


def test_cosine_is_not_taken_on_zero_vectors():
    z, v = np.zeros((2, 3)), np.arange(6.0).reshape(2, 3)
    assert cosine_distance(z, z) == 0.0  # both zero: they agree
    assert cosine_distance(z, v) == 1.0 and cosine_distance(v, z) == 1.0  # one zero: they do not
    assert cosine_distance(v, 2 * v) == pytest.approx(0.0, abs=1e-12)
    assert cosine_distance(v, -v) == pytest.approx(2.0)
    assert max_abs(np.zeros(0), np.zeros(0)) == 0.0


def test_box_iou_degenerate_cases():
    empty, box = [0, 0, 0, 0], [10, 10, 20, 20]
    assert box_iou(empty, empty) == 1.0  # two empty boxes (empty masks) agree
    assert box_iou(empty, box) == 0.0 and box_iou(box, empty) == 0.0  # empty vs non-empty: disagree
    assert box_iou(box, box) == 1.0
    assert box_iou(box, [15, 10, 25, 20]) == pytest.approx(50 / 150)
    assert box_iou(box, [30, 30, 40, 40]) == 0.0
    # the pixel decoder's (B, Q, 4) output: worst 1 - IoU over queries
    a = np.array([[[0, 0, 0, 0], [10, 10, 20, 20]]], float)
    assert box_disagreement(a, a) == 0.0
    b = a.copy()
    b[0, 0] = [1, 1, 3, 3]
    assert box_disagreement(a, b) == 1.0  # what cosine called "distance 1.0" is a real disagreement
    b = a.copy()
    b[0, 1] = [10, 10, 20, 22]
    assert box_disagreement(a, b) == pytest.approx(1 - 100 / 120)


def test_mask_and_box_set_iou():
    e, m = np.zeros((4, 4), bool), np.eye(4, dtype=bool)
    assert mask_iou(e, e) == 1.0 and mask_iou(e, m) == 0.0 and mask_iou(m, m) == 1.0
    none = np.zeros((0, 4))
    one = np.array([[0, 0, 10, 10]], float)
    two = np.array([[0, 0, 10, 10], [20, 20, 30, 30]], float)
    assert box_set_iou(none, none) == 1.0 and box_set_iou(none, one) == 0.0 and box_set_iou(one, none) == 0.0
    assert box_set_iou(two, two[::-1]) == 1.0  # order does not matter
    assert box_set_iou(two, one) == pytest.approx(0.5)  # a missed box counts 0


def test_summary_reports_mean_worst_and_an_observed_5th_percentile():
    s = summarize([1.0] * 28 + [0.9, 0.5])
    assert s == {"n": 30, "mean": pytest.approx((28 + 1.4) / 30), "worst": 0.5, "p5": 0.9}
    assert summarize([]) is None


def test_spec_declares_how_each_output_is_compared(tiny):
    from export.specs import SPECS

    spec = SPECS["pixel_decoder"](tiny[0].config)
    assert spec.comparison("boxes", "int8") == ("box_iou", 0.1)
    assert spec.comparison("boxes", "fp32") == ("max_abs", 1e-3)
    assert spec.comparison("masks", "int8") == ("cosine", 5e-2)
    assert SPECS["prompt_encoder"](tiny[0].config).comparison("region_tokens", "int8") == ("cosine", 2e-2)
