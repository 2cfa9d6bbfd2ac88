"""``egx eval``: the field's metrics per task, dataset and modality on the validation split,
through ``Predictor`` (so the PyTorch reference and built engines are scored the same way).

Requests are worded with the instruction templates, one phrasing per image chosen by a hash
of its name (fixed across runs). Per image every applicable task runs on one encoding
(the image cache): ``classify`` (AID, MSTAR), ``caption`` (AID), ``segment`` ("Segment all
ships", "... the infrared targets", "... the roads"), ``grounding`` (boxes = connected
components of the ``[SEG]`` mask) and ``click`` (a point inside each object, up to
``CLICKS_PER_IMAGE`` per image). Baselines beside them: the training split's majority class,
its most frequent caption, and a mask of nothing.
"""
from __future__ import annotations

import hashlib
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np

from ..data import templates as T
from ..data.readers import Sample
from ..generation import GenerationConfig
from ..imageio import read_image
from ..processing import VisualPrompts, inside_point
from . import metrics as M

CLICKS_PER_IMAGE = 4
IR_DATASETS = ("sirst", "sirst-v2")
SEGMENT_NOUNS = ("ship", "target", "road")


@dataclass
class EvalOptions:
    limit: int | None = None  # images per dataset (None: all)
    caption_tokens: int = 40
    answer_tokens: int = 12
    tasks: tuple[str, ...] = ("classify", "caption", "segment", "grounding", "click")
    zoom: bool = True  # clicks on large images answered on the window around them (Predictor.predict)


def _pick(options: tuple[str, ...], key: str) -> str:
    h = int.from_bytes(hashlib.sha1(key.encode()).digest()[:4], "big")
    return options[h % len(options)]


def _nouns(noun: str) -> tuple[str, str]:
    return T.NOUNS[noun]


def select(samples: list[Sample], limit: int | None) -> list[Sample]:
    """Up to ``limit`` samples per dataset, spread over its classes by a fixed hash order."""
    by: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        by[s.dataset].append(s)
    out = []
    for name in sorted(by):
        items = sorted(by[name], key=lambda s: hashlib.sha1(str(s.image).encode()).hexdigest())
        out += items if limit is None else items[:limit]
    return out


class Accumulator:
    """Per ``(task, dataset)`` raw counts, turned into metrics by ``report``."""

    def __init__(self) -> None:
        self.data: dict[tuple[str, str], dict] = defaultdict(lambda: defaultdict(list))
        self.modality: dict[str, str] = {}

    def add(self, task: str, sample: Sample, **values) -> None:
        self.modality[sample.dataset] = sample.modality
        for k, v in values.items():
            self.data[(task, sample.dataset)][k].append(v)

    def report(self) -> list[dict]:
        rows = []
        for (task, ds), d in sorted(self.data.items()):
            row = {"task": task, "dataset": ds, "modality": self.modality[ds]}
            if task == "classify":
                row.update(n=len(d["correct"]), accuracy=float(np.mean(d["correct"])))
            elif task == "caption":
                row.update(n=len(d["hyp"]), bleu4=M.bleu4(d["hyp"], d["refs"]))
            elif task in ("segment", "click"):
                inter, union = np.sum(d["inter"]), np.sum(d["union"])
                row.update(n=len(d["iou"]), ciou=float(inter / union) if union else 1.0, miou=float(np.mean(d["iou"])))
                if task == "segment" and ds in IR_DATASETS:
                    row.update(pd=float(np.sum(d["detected"]) / max(1, np.sum(d["targets"]))),
                               fa=float(np.sum(d["false_px"]) / max(1, np.sum(d["pixels"]))))
            elif task == "grounding":
                tp, npred, ngt = np.sum(d["tp"]), np.sum(d["npred"]), np.sum(d["ngt"])
                row.update(n=len(d["tp"]), precision=float(tp / npred) if npred else 0.0,
                           recall=float(tp / ngt) if ngt else 1.0)
            rows.append(row)
        return rows


def evaluate(predictor, samples: list[Sample], opts: EvalOptions, train_samples: list[Sample] | None = None,
             progress: bool = True) -> dict:
    """Metrics of ``predictor`` on ``samples`` (and baselines from ``train_samples``)."""
    acc = Accumulator()
    base = Accumulator()
    classes: dict[str, list[str]] = defaultdict(set)
    for s in list(samples) + list(train_samples or []):
        if s.label:
            classes[s.dataset].add(T.readable_class(s.label))
    classes = {k: sorted(v) for k, v in classes.items()}
    majority = {ds: Counter(T.readable_class(s.label) for s in (train_samples or []) if s.dataset == ds and s.label)
                .most_common(1) for ds in classes}
    captions = Counter(T.clean_caption(c) for s in (train_samples or []) for c in s.captions)
    common_caption = captions.most_common(1)[0][0] if captions else ""
    short = GenerationConfig(max_new_tokens=opts.answer_tokens)
    long = GenerationConfig(max_new_tokens=opts.caption_tokens)
    started = time.perf_counter()
    tty = sys.stderr.isatty()
    for i, s in enumerate(samples):
        image = np.asarray(read_image(s.image).data)
        key = s.image.name
        if "classify" in opts.tasks and s.label:
            q = _pick(T.CLASSIFY_VEHICLE if s.dataset == "mstar" else T.CLASSIFY_SCENE, key)
            r = predictor.predict(image, s.modality, q, task="classify", generation=short)
            truth = T.readable_class(s.label)
            acc.add("classify", s, correct=M.class_in_text(r.text, classes[s.dataset]) == truth)
            if majority.get(s.dataset):
                base.add("classify", s, correct=majority[s.dataset][0][0] == truth)
        if "caption" in opts.tasks and s.captions:
            r = predictor.predict(image, s.modality, _pick(T.CAPTION, key), task="caption", generation=long)
            refs = [T.clean_caption(c) for c in s.captions]
            acc.add("caption", s, hyp=r.text.strip(), refs=refs)
            if common_caption:
                base.add("caption", s, hyp=common_caption, refs=refs)
        if s.noun in SEGMENT_NOUNS and (s.masks or s.dataset in IR_DATASETS):
            _segment_tasks(predictor, image, s, key, opts, short, acc, base)
        if progress:
            el = time.perf_counter() - started
            line = f"eval {i + 1}/{len(samples)} images, {el:.0f} s, ETA {el / (i + 1) * (len(samples) - i - 1):.0f} s"
            print(("\r" + line) if tty else line, end="" if tty else "\n", file=sys.stderr, flush=True)
    if progress and tty:
        print(file=sys.stderr)
    return {"rows": acc.report(), "baseline": base.report(), "images": len(samples)}


def _segment_tasks(predictor, image, s: Sample, key: str, opts: EvalOptions, gen, acc, base) -> None:
    h, w = image.shape[:2]
    truth = np.zeros((h, w), dtype=bool)
    for m in s.masks:
        truth |= m
    noun, nouns = _nouns(s.noun)
    if "segment" in opts.tasks:
        q = _pick(T.SEGMENT_ALL, key).format(noun=noun, nouns=nouns)
        r = predictor.predict(image, s.modality, q, task="segment", generation=gen)
        pred = np.zeros((h, w), dtype=bool)
        for m in r.masks:
            pred |= m
        for target, a in ((pred, acc), (np.zeros_like(pred), base)):
            inter, union, iou = M.mask_iou(target, truth)
            extra = {}
            if s.dataset in IR_DATASETS:
                det, n, fp = M.target_detection(target, s.masks)
                extra = {"detected": det, "targets": n, "false_px": fp, "pixels": h * w}
            a.add("segment", s, inter=inter, union=union, iou=iou, **extra)
    if "grounding" in opts.tasks and s.instances:
        q = _pick(T.GROUND_ALL, key).format(noun=noun, nouns=nouns)
        r = predictor.predict(image, s.modality, q, task="grounding", generation=gen)
        boxes = np.asarray([b for b, src in zip(r.boxes, r.box_sources) if src == "pixel_decoder"]).reshape(-1, 4)
        acc.add("grounding", s, tp=M.match_boxes(boxes, s.boxes), npred=len(boxes), ngt=len(s.boxes))
        base.add("grounding", s, tp=0, npred=0, ngt=len(s.boxes))
    if "click" in opts.tasks and s.instances:
        for k, point in clicks(s):
            r = predictor.predict(image, s.modality, "", VisualPrompts([point], [], []), task="click", zoom=opts.zoom)
            inter, union, iou = M.mask_iou(r.masks[0], s.masks[k])
            acc.add("click", s, inter=inter, union=union, iou=iou)
            base.add("click", s, inter=0, union=int(s.masks[k].sum()), iou=0.0)


def clicks(s: Sample) -> list[tuple[int, tuple[float, float]]]:
    """The clicks ``egx eval`` scores on ``s``: ``(object index, point)`` for its largest
    ``CLICKS_PER_IMAGE`` objects, the point inside each (``processing.inside_point``)."""
    order = np.argsort([-m.sum() for m in s.masks])[:CLICKS_PER_IMAGE]
    return [(int(k), inside_point(s.masks[k])) for k in order]


def format_table(report: dict) -> str:
    """The report as a fixed-width table: one line per task and dataset, baseline beside."""
    base = {(r["task"], r["dataset"]): r for r in report["baseline"]}
    keys = ("accuracy", "bleu4", "ciou", "miou", "pd", "fa", "precision", "recall")
    lines = [f"{'task':10s} {'dataset':11s} {'modality':9s} {'n':>5s}  metrics (baseline)"]
    for r in report["rows"]:
        b = base.get((r["task"], r["dataset"]), {})
        parts = []
        for k in keys:
            if k in r:
                v = r[k]
                txt = f"{k} {v:.2e}" if k == "fa" else f"{k} {v:.3f}"
                if k in b:
                    txt += f" ({b[k]:.2e})" if k == "fa" else f" ({b[k]:.3f})"
                parts.append(txt)
        lines.append(f"{r['task']:10s} {r['dataset']:11s} {r['modality']:9s} {r['n']:5d}  " + ", ".join(parts))
    return "\n".join(lines)
