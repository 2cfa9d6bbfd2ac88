"""Accuracy of a reduced-precision pipeline against the FP32 one, on evaluation images that
were not used for calibration: what the user would see, request by request.

Per evaluation item (``calibration.dataset.evaluation_requests``):
* ``segment`` (a click on an object, one forced ``[SEG]``): mask IoU and box IoU of the
  decoder's answer (original image frame);
* ``grounding``: the boxes answered, as a set (``export.metrics.box_set_iou``);
* ``region``: greedy-token agreement of the LLM on the FP32 tokens (teacher-forced, counted
  where FP32's top-1 probability margin exceeds ``margin``) and the answer itself;
* ``classify`` (items with an image-level label): the answer.
An *answer* is the greedy text of up to ``answer_tokens`` tokens through the whole chain;
two answers agree when their tokens are equal. An answer is counted only where FP32 chose
every one of its tokens by more than ``margin`` (elsewhere FP32 itself is a coin toss).

The FP32 answers are computed once (``Evaluation``) and every candidate is compared with
them. Results are kept per request (``Outcome``) and summarised per modality, per dataset and
per object-size bucket by ``export.gate.summarize_outcomes``."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from earthgptx.generation import GenerationConfig, prefill_feed, step_feed
from earthgptx.prompting import build_prompt, splice

from .metrics import box_ious, box_set_iou, cosine_distance, mask_iou

MARGIN = 0.05
TEACHER_FORCED_STEPS = 8
ANSWER_TOKENS = 8


@dataclass
class Outcome:
    """One request's agreement: lists of IoUs (one per mask / box / box set) and counts."""

    modality: str
    dataset: str
    bucket: str
    task: str
    item: str
    mask_iou: list[float] = field(default_factory=list)
    box_iou: list[float] = field(default_factory=list)
    tokens_agree: int = 0
    tokens_counted: int = 0
    answer_agrees: bool | None = None  # None: not an answer request, or FP32 was not decisive


@dataclass
class _Reference:
    """What FP32 answered for one request."""

    masks: list[np.ndarray]
    boxes: np.ndarray
    answer: list[int] | None = None
    decisive: bool = False
    embeds: np.ndarray | None = None  # the LLM prompt, for teacher forcing
    tokens: list[int] = field(default_factory=list)
    margins: list[float] = field(default_factory=list)


def _margin(logits: np.ndarray) -> float:
    z = logits.astype(np.float64)
    p = np.exp(z - z.max())
    p /= p.sum()
    top2 = np.sort(p)[-2:]
    return float(top2[1] - top2[0])


class _MarginRunner:
    """Wraps an ``llm`` runner and keeps the top-1 margin of every call's logits."""

    def __init__(self, inner) -> None:
        self.inner, self.margins = inner, []

    def __call__(self, feed):
        out = self.inner(feed)
        self.margins.append(_margin(out["logits"][0]))
        return out


def _greedy(llm, embeds: np.ndarray, table: np.ndarray, cfg, steps: int) -> tuple[list[int], list[float]]:
    """FP32's greedy tokens from prompt ``embeds`` ``(T, hidden)`` and their margins."""
    feed, tokens, margins = prefill_feed(embeds, cfg), [], []
    for step in range(steps):
        out = llm(feed)
        logits = out["logits"][0]
        tokens.append(int(np.argmax(logits)))
        margins.append(_margin(logits))
        feed = step_feed(table[tokens[-1]], embeds.shape[0] + step, out, cfg)
    return tokens, margins


def _forced(llm, embeds: np.ndarray, table: np.ndarray, cfg, tokens: list[int]) -> list[int]:
    """``llm``'s argmax at each step when fed ``tokens`` (teacher forcing)."""
    feed, chosen = prefill_feed(embeds, cfg), []
    for step, tok in enumerate(tokens):
        out = llm(feed)
        chosen.append(int(np.argmax(out["logits"][0])))
        feed = step_feed(table[tok], embeds.shape[0] + step, out, cfg)
    return chosen


class Evaluation:
    """The FP32 pipeline's answers on ``items`` (computed once, on first use) and the
    comparison of any other pipeline with them. ``requests_fn(item, shape)`` gives
    ``(text, prompts, task, bucket)`` per request."""

    def __init__(self, ref, items, requests_fn, margin: float = MARGIN, answer_tokens: int = ANSWER_TOKENS,
                 teacher_forced_steps: int = TEACHER_FORCED_STEPS, progress=None) -> None:
        """``progress(what, done, total)``, if given, is called after every item."""
        self.ref, self.items, self.requests_fn, self.progress = ref, items, requests_fn, progress
        self.margin, self.answer_tokens, self.steps = margin, answer_tokens, teacher_forced_steps
        self._reference: list[list[tuple[tuple, _Reference]]] | None = None

    def _ask(self, predictor, image, modality, request, tokens: int):
        text, prompts, task, _ = request
        return predictor.predict(image, modality, text, prompts, task=task,
                                 generation=GenerationConfig(max_new_tokens=tokens))

    def _answer_request(self, task: str) -> bool:
        return task in ("region", "classify", "caption", "vqa")

    def reference(self) -> list[list[tuple[tuple, _Reference]]]:
        if self._reference is not None:
            return self._reference
        ref, out = self.ref, []
        for item in self.items:
            image = item.image()
            per_item = []
            for request in self.requests_fn(item, image.shape[:2]):
                text, prompts, task, _ = request
                if self._answer_request(task):
                    llm = ref.runners["llm"]
                    ref.runners["llm"] = counting = _MarginRunner(llm)
                    try:
                        p = self._ask(ref, image, item.modality, request, self.answer_tokens)
                    finally:
                        ref.runners["llm"] = llm
                    r = _Reference([], np.zeros((0, 4)), p.token_ids, bool(counting.margins) and
                                   min(counting.margins[:len(p.token_ids) + 1]) > self.margin)
                    if task == "region":
                        r.embeds = self._region_embeds(image, item.modality, text, prompts)
                        r.tokens, r.margins = _greedy(llm, r.embeds, ref.embed_table, ref.config.llm, self.steps)
                else:
                    p = self._ask(ref, image, item.modality, request, 0)
                    r = _Reference(p.masks, np.asarray(p.boxes).reshape(-1, 4))
                per_item.append((request, r))
            ref.clear_cache()
            out.append(per_item)
            if self.progress is not None:
                self.progress("FP32 reference", len(out), len(self.items))
        self._reference = out
        return out

    def _region_embeds(self, image, modality: str, text: str, prompts) -> np.ndarray:
        """FP32's LLM prompt ``(T, hidden)`` for a region request (image and region tokens spliced)."""
        from earthgptx.processing import prompt_encoder_feed

        ref = self.ref
        enc, _ = ref.encode_image(image, modality)
        feed = {"image_tokens": enc.image_tokens, **prompt_encoder_feed(prompts, enc.letterbox, ref.config.prompt.mask_size)}
        region = ref.runners["prompt_encoder"](feed)["region_tokens"][0]
        ids = ref.tokenizer(build_prompt(text, modality, len(prompts), False), add_special_tokens=False,
                            return_tensors="np")["input_ids"][0]
        return splice(ids, ref.embed_table, enc.image_tokens[0], region, ref.image_id, ref.region_ids)

    def compare(self, test) -> list[Outcome]:
        """Every request's agreement of predictor ``test`` with FP32."""
        outcomes = []
        for n, (item, per_item) in enumerate(zip(self.items, self.reference()), 1):
            image = item.image()
            for request, r in per_item:
                text, prompts, task, bucket = request
                o = Outcome(item.modality, item.dataset, bucket, task, item.key)
                if self._answer_request(task):
                    p = self._ask(test, image, item.modality, request, self.answer_tokens)
                    o.answer_agrees = (p.token_ids == r.answer) if r.decisive else None
                    if r.embeds is not None:
                        chosen = _forced(test.runners["llm"], r.embeds, test.embed_table, test.config.llm, r.tokens)
                        sure = [m > self.margin for m in r.margins]
                        o.tokens_counted = sum(sure)
                        o.tokens_agree = sum(s and a == b for s, a, b in zip(sure, chosen, r.tokens))
                else:
                    p = self._ask(test, image, item.modality, request, 0)
                    boxes = np.asarray(p.boxes).reshape(-1, 4)
                    if task == "grounding":
                        o.box_iou = [box_set_iou(r.boxes, boxes)]
                    else:
                        o.mask_iou = [mask_iou(a, b) for a, b in zip(r.masks, p.masks)]
                        o.mask_iou += [0.0] * abs(len(r.masks) - len(p.masks))  # a missing mask disagrees
                        if len(r.boxes) == len(boxes):
                            o.box_iou = [float(v) for v in box_ious(r.boxes, boxes)]
                        else:
                            o.box_iou = [box_set_iou(r.boxes, boxes)]
                outcomes.append(o)
            test.clear_cache()
            if self.progress is not None:
                self.progress("comparison", n, len(self.items))
        return outcomes


def engine_metrics(ref_runner, runner, feeds: list[dict]) -> dict:
    """Worst cosine similarity (``1 - cosine distance``, zero tensors handled) and max abs
    error of ``runner`` vs ``ref_runner`` over ``feeds``."""
    worst_cos, worst_err = 1.0, 0.0
    for feed in feeds:
        a, b = ref_runner(feed), runner(feed)
        for name, x in a.items():
            x, y = np.asarray(x, np.float64), np.asarray(b[name], np.float64)
            if x.size == 0:
                continue
            worst_err = max(worst_err, float(np.max(np.abs(x - y))))
            worst_cos = min(worst_cos, 1.0 - cosine_distance(x, y))
    return {"cosine": worst_cos, "max_abs": worst_err, "cases": len(feeds)}
