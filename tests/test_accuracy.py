"""Task-level agreement (export/accuracy.py): the same answers agree, different answers do
not, and an answer FP32 itself was not sure of is not counted."""
import numpy as np
import pytest

from calibration.dataset import Item, evaluation_requests
from export.accuracy import Evaluation
from export.gate import summarize_outcomes


class _Logits:
    """An ``llm`` runner whose logits are scaled (``scale`` >> 1: decisive answers) and
    optionally negated (another argmax: other answers)."""

    def __init__(self, inner, scale: float, negate: bool = False) -> None:
        self.inner, self.scale, self.negate = inner, scale, negate

    def __call__(self, feed):
        out = dict(self.inner(feed))
        out["logits"] = out["logits"] * self.scale * (-1 if self.negate else 1)
        return out


def _with_llm(predictor, llm):
    from earthgptx.predictor import Predictor

    return Predictor({**predictor.runners, "llm": llm}, predictor.tokenizer, predictor.config, predictor.embed_table)


@pytest.fixture(scope="module")
def items(data_root):
    from calibration.listing import discover

    ships, _ = discover(data_root / "sar" / "hrsid")
    chip = next((data_root / "sar" / "mstar" / "T72").iterdir())
    return [ships[0], Item(chip, "sar", None, np.zeros((0, 4)), dataset="mstar", label="T72")]


def test_answers_masks_and_boxes_are_compared_per_request(tiny_predictor, items):
    llm = tiny_predictor.runners["llm"]
    ref = _with_llm(tiny_predictor, _Logits(llm, 1e4))
    evaluation = Evaluation(ref, items, evaluation_requests, answer_tokens=3, teacher_forced_steps=3)
    same = summarize_outcomes(evaluation.compare(_with_llm(tiny_predictor, _Logits(llm, 1e4))))["sar"]
    other = summarize_outcomes(evaluation.compare(_with_llm(tiny_predictor, _Logits(llm, 1e4, negate=True))))["sar"]
    # 2 items: a ship chip (segment, region, grounding) and a labelled MSTAR chip (+ classify)
    assert same["images"] == 2 and same["requests"] == 7 and same["answers_asked"] == 3
    assert set(same["per_dataset"]) == {"hrsid", "mstar"} and "none" in same["per_size"]
    assert same["answers_counted"] == 3 and same["answer_agreement"] == 1.0  # decisive and identical
    assert same["token_agreement"] == 1.0 and same["tokens_counted"] == 6
    assert same["mask_iou"]["worst"] == 1.0 and same["box_iou"]["worst"] == 1.0
    assert other["answers_counted"] == 3 and other["answer_agreement"] == 0.0  # another argmax: another answer
    assert other["token_agreement"] == 0.0


def test_answers_fp32_was_not_sure_of_are_not_counted(tiny_predictor, items):
    llm = tiny_predictor.runners["llm"]
    ref = _with_llm(tiny_predictor, _Logits(llm, 1e-6))  # flat: every token a coin toss
    evaluation = Evaluation(ref, items[1:], evaluation_requests, answer_tokens=3, teacher_forced_steps=3)
    r = summarize_outcomes(evaluation.compare(_with_llm(tiny_predictor, _Logits(llm, 1e4, negate=True))))["sar"]
    assert r["answers_asked"] == 2 and r["answers_counted"] == 0 and r["answer_agreement"] is None
    assert r["tokens_counted"] == 0 and r["token_agreement"] is None
