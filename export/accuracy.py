"""Accuracy of reduced-precision engines against FP32, on evaluation images that were not
used for calibration, per modality, and the gate that decides which parts stay INT8.

Per engine: output cosine and max error vs the FP32 engine on the feeds the chain produces.
End to end: mask IoU and box IoU between the reduced and the FP32 pipelines (one forced
``[SEG]`` per request), and greedy-token agreement, counted only where the FP32 top-1
probability margin exceeds ``margin`` (elsewhere the two choices are a coin toss)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from earthgptx.generation import GenerationConfig, prefill_feed, step_feed
from earthgptx.prompting import build_prompt, splice


@dataclass(frozen=True)
class Gate:
    mask_iou: float = 0.98
    box_iou: float = 0.98
    token_agreement: float = 0.99

    def failures(self, per_modality: dict) -> list[str]:
        out = []
        for m, r in per_modality.items():
            for key in ("mask_iou", "box_iou", "token_agreement"):
                if r[key] is not None and r[key] < getattr(self, key):
                    out.append(f"{m} {key} {r[key]:.4f} < {getattr(self, key)}")
        return out


def engine_metrics(ref_runner, runner, feeds: list[dict]) -> dict:
    """Worst cosine and max abs error of ``runner`` vs ``ref_runner`` over ``feeds``."""
    worst_cos, worst_err = 1.0, 0.0
    for feed in feeds:
        a, b = ref_runner(feed), runner(feed)
        for name, x in a.items():
            x, y = np.asarray(x, np.float64).ravel(), np.asarray(b[name], np.float64).ravel()
            if x.size == 0:
                continue
            worst_err = max(worst_err, float(np.max(np.abs(x - y))))
            den = np.linalg.norm(x) * np.linalg.norm(y)
            cos = float(x @ y / den) if den > 0 else float(np.array_equal(x, y))
            worst_cos = min(worst_cos, cos)
    return {"cosine": worst_cos, "max_abs": worst_err, "cases": len(feeds)}


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def box_iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    area = lambda x: max(0.0, x[2] - x[0]) * max(0.0, x[3] - x[1])  # noqa: E731
    union = area(a) + area(b) - ix * iy
    return 1.0 if union == 0 else float(ix * iy / union)


def token_agreement(ref, test, text: str, modality: str, image, prompts, steps: int = 16,
                    margin: float = 0.05) -> tuple[int, int]:
    """Teacher-forced greedy decode of ``ref``'s tokens through both LLMs: ``(agreeing, counted)``."""
    enc, _ = ref.encode_image(image, modality)
    region = None
    if len(prompts):
        from earthgptx.processing import prompt_encoder_feed

        feed = {"image_tokens": enc.image_tokens,
                **prompt_encoder_feed(prompts, enc.letterbox, ref.config.prompt.mask_size)}
        region = ref.runners["prompt_encoder"](feed)["region_tokens"][0]
    ids = ref.tokenizer(build_prompt(text, modality, len(prompts), False), add_special_tokens=False,
                        return_tensors="np")["input_ids"][0]
    embeds = splice(ids, ref.embed_table, enc.image_tokens[0], region, ref.image_id, ref.region_ids)
    c = ref.config.llm
    t = embeds.shape[0]
    feeds = [prefill_feed(embeds, c), prefill_feed(embeds, c)]
    agree = counted = 0
    for step in range(steps):
        outs = [ref.runners["llm"](feeds[0]), test.runners["llm"](feeds[1])]
        logits = outs[0]["logits"][0].astype(np.float64)
        p = np.exp(logits - logits.max())
        p /= p.sum()
        top2 = np.sort(p)[-2:]
        tok = int(np.argmax(logits))
        if top2[1] - top2[0] > margin:
            counted += 1
            agree += int(int(np.argmax(outs[1]["logits"][0])) == tok)
        feeds = [step_feed(ref.embed_table[tok], t + step, out, c) for out in outs]
    return agree, counted


def end_to_end(ref, test, items, requests_fn) -> dict:
    """Per modality: mean mask IoU, mean box IoU and token agreement of ``test`` vs ``ref``."""
    results: dict[str, dict] = {}
    for item in items:
        image = item.image()
        r = results.setdefault(item.modality, {"mask": [], "box": [], "agree": 0, "counted": 0})
        for text, prompts, task in requests_fn(item, 3):
            if task == "region":
                a, n = token_agreement(ref, test, text, item.modality, image, prompts)
                r["agree"] += a
                r["counted"] += n
                continue
            gen = GenerationConfig(max_new_tokens=0)
            pa = ref.predict(image, item.modality, text, prompts, task=task, generation=gen)
            pb = test.predict(image, item.modality, text, prompts, task=task, generation=gen)
            r["box"] += [box_iou(x, y) for x, y in zip(pa.boxes, pb.boxes)]
            r["mask"] += [iou(x, y) for x, y in zip(pa.masks, pb.masks)]
        ref.clear_cache()
        test.clear_cache()
    return {m: {"mask_iou": float(np.mean(r["mask"])) if r["mask"] else None,
                "box_iou": float(np.mean(r["box"])) if r["box"] else None,
                "token_agreement": r["agree"] / r["counted"] if r["counted"] else None,
                "tokens_counted": r["counted"], "images": sum(1 for i in items if i.modality == m)}
            for m, r in results.items()}
