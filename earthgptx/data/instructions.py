"""Annotations -> instruction samples of every level the paper names.

* scene: ``classify`` (AID scenes, MSTAR vehicles), ``caption`` (RSICD), ``modality``,
  ``count`` and ``presence`` questions (images with objects; negatives across modalities);
* region: ``region`` — a point, box or free-form prompt on an object -> what it is;
* grounding: ``grounding`` — text -> ``[SEG]`` (mask-derived boxes) and the boxes written in
  the answer in EarthGPT's normalised ``[x0,y0,x1,y1]`` form;
* referring segmentation: ``segment`` — text ("all ships", "the ship nearest the top-left
  corner", "the largest ship") or a visual prompt -> ``[SEG]`` mask;
* ``click``: a point/box prompt -> the object's mask, no LLM.

An ``Instruction`` keeps prompts and mask targets in the original image frame; the
training dataset maps them to the model frame with ``processing.Letterbox`` (the one place
coordinates are transformed). Mixing: ``InstructionMix`` draws each epoch's instructions
by task weight, then a dataset (probability proportional to the square root of its size,
so that 24 road tiles are not drowned by 3,000 AID scenes), then an image, all seeded.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import InputError
from ..processing import Letterbox, VisualPrompts, format_box, inside_point, mask_box
from . import templates as T
from .readers import Sample

# instructions a step draws by task (vision items carry most clicks: instructions need few; with
# class words naming a class is copying it, so classification questions need fewer than run 4's 0.30)
TASK_WEIGHTS = {"classify": 0.16, "caption": 0.18, "modality": 0.02, "count": 0.04, "presence": 0.04,
                "region": 0.08, "segment": 0.32, "grounding": 0.12, "click": 0.04}
MAX_TEXT_BOXES = 4  # boxes written in a grounding answer (largest first)
VISION_TASK = "vision"  # an image for the vision encoder's training-only heads: no text, no LLM


@dataclass
class Instruction:
    """One training/evaluation sample. ``text``: the user's words (may hold ``<regionK>``);
    ``answer``: the assistant's words (after ``[SEG]`` when ``seg``); ``prompts``: visual
    prompts, original frame; ``target``: indices into ``sample.masks`` whose union is the
    mask target (``()`` an empty mask, ``None`` no mask)."""

    sample: Sample
    task: str
    text: str
    answer: str
    prompts: VisualPrompts = field(default_factory=lambda: VisualPrompts([], [], []))
    target: tuple[int, ...] | None = None
    seg: bool = False

    def describe(self) -> str:
        p = self.prompts
        parts = [f"[{self.task}] {self.sample.dataset}:{self.sample.image.name} ({self.sample.modality})",
                 f"  user: {self.text}" if self.text else "  user: (no text: click)",
                 f"  assistant: {'[SEG] ' if self.seg else ''}{self.answer}"]
        if len(p):
            parts.append(f"  prompts: points {[tuple(round(v) for v in q) for q in p.points]}, "
                         f"boxes {[tuple(round(v) for v in b) for b in p.boxes]}, free-form {len(p.freeforms)}")
        if self.target is not None:
            parts.append(f"  mask target: union of object(s) {list(self.target)}" if self.target else
                         "  mask target: empty")
        return "\n".join(parts)


def _nouns(sample: Sample, rng: np.random.Generator) -> tuple[str, str]:
    variants = T.NOUN_VARIANTS.get(sample.noun)
    if variants:
        return variants[int(rng.integers(len(variants)))]
    return T.NOUNS.get(sample.noun, ("object", "objects"))


def _pick(options, rng: np.random.Generator):
    return options[int(rng.integers(len(options)))]


def _shape(sample: Sample) -> tuple[int, int] | None:
    return sample.masks[0].shape if sample.masks else None


def _jitter_box(box: np.ndarray, shape: tuple[int, int], rng: np.random.Generator) -> tuple[float, ...]:
    """An object's box moved by up to 10 % of its side per edge, kept inside the image."""
    h, w = shape
    x0, y0, x1, y1 = box
    dx, dy = 0.1 * (x1 - x0), 0.1 * (y1 - y0)
    j = rng.uniform(-1, 1, 4) * np.array([dx, dy, dx, dy])
    b = np.clip(np.array(box) + j, 0, [w, h, w, h])
    if b[2] - b[0] < 1 or b[3] - b[1] < 1:
        b = np.clip(np.array(box, dtype=float), 0, [w, h, w, h])
    return tuple(float(v) for v in b)


def _point_on(mask: np.ndarray, rng: np.random.Generator) -> tuple[float, float]:
    """A random pixel of the object (half the time the one nearest its centroid)."""
    if rng.random() < 0.5:
        return inside_point(mask)
    ys, xs = np.nonzero(mask)
    i = int(rng.integers(len(xs)))
    return float(xs[i]), float(ys[i])


def _scribble(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A free-form prompt drawn from an object: the mask itself or a thick stroke through it."""
    import cv2

    if rng.random() < 0.5 or mask.sum() < 16:
        return mask.copy()
    ys, xs = np.nonzero(mask)
    a, b = rng.integers(len(xs), size=2)
    stroke = np.zeros(mask.shape, dtype=np.uint8)
    width = max(1, int(0.15 * np.sqrt(mask.sum())))
    cv2.line(stroke, (int(xs[a]), int(ys[a])), (int(xs[b]), int(ys[b])), 1, width)
    out = stroke.astype(bool) & mask
    return out if out.any() else mask.copy()


def click_prompt(mask: np.ndarray, rng: np.random.Generator) -> VisualPrompts:
    """What a user clicks or drags on an object, from its ``(H, W)`` bool mask: a point on it
    (half the time) or its box, jittered; in the mask's pixel frame."""
    if rng.random() < 0.5:
        return VisualPrompts([_point_on(mask, rng)], [], [])
    return VisualPrompts([], [_jitter_box(np.asarray(mask_box(mask), dtype=float), mask.shape, rng)], [])


def clicks_on(inst: Instruction) -> bool:
    """Whether ``inst`` is a ``VISION_TASK`` item that also carries a click query (a point or box
    on one of its image's objects -> that object's mask, through the prompt-driven pixel decoder)."""
    return inst.task == VISION_TASK and inst.sample.noun in ("ship", "target", "road") and bool(inst.sample.masks)


def _visual_prompt(sample: Sample, k: int, rng: np.random.Generator) -> VisualPrompts:
    """One point, box or free-form prompt on object ``k``."""
    mask = sample.masks[k]
    kind = rng.choice(["point", "box", "freeform"], p=[0.4, 0.4, 0.2])
    if kind == "point":
        return VisualPrompts([_point_on(mask, rng)], [], [])
    if kind == "box":
        return VisualPrompts([], [_jitter_box(sample.boxes[k], mask.shape, rng)], [])
    return VisualPrompts([], [], [_scribble(mask, rng)])


def _order_objects(sample: Sample, rng: np.random.Generator) -> tuple[str, int] | None:
    """A referring phrase that singles out one object (by position or size) and its index;
    None when no phrase is unambiguous (ties within 3 % of the image)."""
    shape = _shape(sample)
    if shape is None or len(sample.masks) < 2:
        return None
    h, w = shape
    side = max(h, w)
    c = np.stack([(sample.boxes[:, 0] + sample.boxes[:, 2]) / 2 / side,
                  (sample.boxes[:, 1] + sample.boxes[:, 3]) / 2 / side], axis=1)
    areas = np.array([m.sum() for m in sample.masks], dtype=float)
    options = []
    for phrase, key in T.POSITIONS.items():
        v = np.array([key(x, y) for x, y in c])
        order = np.argsort(v)
        if v[order[1]] - v[order[0]] > 0.03:
            options.append((phrase, int(order[0])))
    for word, sign in T.SIZES.items():
        order = np.argsort(sign * areas)
        if abs(areas[order[1]] - areas[order[0]]) > 0.25 * areas[order[0]]:
            options.append((f"that is the {word}" if rng.random() < 0.3 else f"*{word}", int(order[0])))
    if not options:
        return None
    return options[int(rng.integers(len(options)))]


def _with_where(template: str, noun: str, where: str) -> str:
    if where.startswith("*"):  # a size word goes before the noun
        return template.replace("the {noun} {where}", f"the {where[1:]} {{noun}}").format(noun=noun)
    return template.format(noun=noun, where=where)


def _boxes_text(sample: Sample, idx: tuple[int, ...]) -> str:
    h, w = _shape(sample)
    lb = Letterbox(h, w, max(h, w))
    chosen = sorted(idx, key=lambda i: -float(sample.masks[i].sum()))[:MAX_TEXT_BOXES]
    chosen = sorted(chosen, key=lambda i: (sample.boxes[i, 1], sample.boxes[i, 0]))
    return ", ".join(format_box(lb.boxes_to_normalized(sample.boxes[i])) for i in chosen)


def applicable_tasks(sample: Sample) -> list[str]:
    """The tasks an image's annotations can teach."""
    tasks = ["modality"]
    if sample.label:
        tasks.append("classify")
    if sample.captions:
        tasks.append("caption")
    if sample.dataset == "mstar":
        tasks.append("region")
    if sample.noun in ("ship", "target", "road", "object") and (sample.masks or sample.dataset.startswith("sirst")):
        tasks += ["presence", "segment", "grounding"]
        if sample.instances and sample.noun != "object":
            tasks.append("count")
        if sample.masks:
            tasks += ["click", "region"]
    return sorted(set(tasks))


def teaches_vision(sample: Sample) -> bool:
    """Whether an image can train the vision encoder's training-only heads (``VISION_TASK``):
    it has a class (AID, MSTAR) or object masks (ships, infrared targets, roads; SIRST-v2's
    empty images teach "no target here")."""
    return bool(sample.label) or (sample.noun in ("ship", "target", "road") and bool(sample.masks)) \
        or sample.dataset.startswith("sirst")


def make_instruction(sample: Sample, task: str, rng: np.random.Generator) -> Instruction | None:
    """One instruction of ``task`` from ``sample``, worded at random; None if it does not apply."""
    if task not in applicable_tasks(sample):
        return None
    noun, nouns = _nouns(sample, rng)
    n = len(sample.masks)
    if task == "classify":
        q = _pick(T.CLASSIFY_VEHICLE if sample.dataset == "mstar" else T.CLASSIFY_SCENE, rng)
        return Instruction(sample, task, q, T.readable_class(sample.label))
    if task == "caption":
        return Instruction(sample, task, _pick(T.CAPTION, rng), T.clean_caption(_pick(sample.captions, rng)))
    if task == "modality":
        return Instruction(sample, task, _pick(T.MODALITY_Q, rng), T.MODALITY_A[sample.modality])
    if task == "count":
        return Instruction(sample, task, _pick(T.COUNT_Q, rng).format(nouns=nouns), str(n))
    if task == "presence":
        return Instruction(sample, task, _pick(T.PRESENCE_Q, rng).format(noun=noun, nouns=nouns),
                           "Yes." if n else "No.")
    if task == "region":
        if sample.dataset == "mstar":  # the vehicle sits in the centre of MSTAR's 128 px chips
            box = (32.0, 32.0, 96.0, 96.0)
            return Instruction(sample, task, _pick(T.REGION_Q, rng).format(region="<region1>"),
                               f"A {T.readable_class(sample.label)}.", VisualPrompts([], [box], []))
        k = int(rng.integers(n))
        answer = (f"A {sample.object_classes[k]}." if sample.object_classes else T.REGION_A[sample.noun])
        return Instruction(sample, task, _pick(T.REGION_Q, rng).format(region="<region1>"), answer,
                           _visual_prompt(sample, k, rng))
    if task == "click":
        k = int(rng.integers(n))
        p = _visual_prompt(sample, k, rng)
        if p.freeforms:  # the decoder takes points and boxes: a free-form prompt clicks as its box
            p = VisualPrompts([], [mask_box(p.freeforms[0])], [])
        return Instruction(sample, task, "", "", p, target=(k,))
    if task == "segment":
        single = _order_objects(sample, rng) if sample.instances else None
        roll = rng.random()
        if n and roll < 0.25:
            k = int(rng.integers(n))
            text = _pick(T.SEGMENT_REGION, rng).format(region="<region1>")
            return Instruction(sample, task, text, f"The {noun}.", _visual_prompt(sample, k, rng), (k,), True)
        if single is not None and roll < 0.55:
            where, k = single
            text = _with_where(_pick(T.SEGMENT_ONE, rng), noun, where)
            return Instruction(sample, task, text, f"The {noun}.", target=(k,), seg=True)
        text = _pick(T.SEGMENT_ALL, rng).format(noun=noun, nouns=nouns)
        answer = f"All {nouns}." if n else f"There is no {noun}."
        return Instruction(sample, task, text, answer, target=tuple(range(n)), seg=True)
    if task == "grounding":
        single = _order_objects(sample, rng) if sample.instances else None
        if single is not None and rng.random() < 0.4:
            where, k = single
            text = _with_where(_pick(T.GROUND_ONE, rng), noun, where)
            return Instruction(sample, task, text, _boxes_text(sample, (k,)), target=(k,), seg=True)
        text = _pick(T.GROUND_ALL, rng).format(noun=noun, nouns=nouns)
        answer = _boxes_text(sample, tuple(range(n))) if n else f"There is no {noun}."
        return Instruction(sample, task, text, answer, target=tuple(range(n)), seg=True)
    raise ValueError(f"unknown task {task!r}")


class InstructionMix:
    """Seeded instruction draws over ``samples`` (the training split).

    ``epoch(e, n)``: ``n`` instructions; each picks a task by ``weights`` (among tasks some
    sample can teach), a dataset with probability proportional to the square root of its
    number of images that can teach the task, then an image uniformly. ``images(e, n)``:
    ``n`` ``VISION_TASK`` items for the vision encoder's training-only heads, a dataset
    drawn the same way among those that ``teaches_vision``, then an image.
    """

    def __init__(self, samples: list[Sample], weights: dict[str, float] | None = None, seed: int = 0) -> None:
        self.samples = samples
        self.seed = seed
        weights = dict(weights or TASK_WEIGHTS)
        unknown = set(weights) - set(TASK_WEIGHTS)
        if unknown:
            raise InputError(f"unknown tasks in weights: {sorted(unknown)}; known: {', '.join(TASK_WEIGHTS)}")
        self.pools: dict[str, dict[str, list[int]]] = {}
        for i, s in enumerate(samples):
            for t in applicable_tasks(s):
                self.pools.setdefault(t, {}).setdefault(s.dataset, []).append(i)
        self.tasks = [t for t in weights if weights[t] > 0 and t in self.pools]
        if not self.tasks:
            raise InputError("no sample can teach any task with a positive weight (check --task-weights and --dataset)")
        w = np.array([weights[t] for t in self.tasks], dtype=float)
        self.task_p = w / w.sum()
        self.vision_pools: dict[str, list[int]] = {}
        for i, s in enumerate(samples):
            if teaches_vision(s):
                self.vision_pools.setdefault(s.dataset, []).append(i)

    def _dataset(self, pools: dict[str, list[int]], rng: np.random.Generator) -> list[int]:
        names = sorted(pools)
        size = np.sqrt([len(pools[d]) for d in names])
        return pools[names[int(rng.choice(len(names), p=size / size.sum()))]]

    def images(self, e: int, n: int) -> list[Instruction]:
        if n and not self.vision_pools:
            raise InputError("--vision-batch: no training image has a class or object masks")
        rng = np.random.default_rng([self.seed, e, 1])
        out = []
        for _ in range(n):
            pool = self._dataset(self.vision_pools, rng)
            out.append(Instruction(self.samples[pool[int(rng.integers(len(pool)))]], VISION_TASK, "", ""))
        return out

    def epoch(self, e: int, n: int) -> list[Instruction]:
        rng = np.random.default_rng([self.seed, e])
        out: list[Instruction] = []
        while len(out) < n:
            task = self.tasks[int(rng.choice(len(self.tasks), p=self.task_p))]
            pool = self._dataset(self.pools[task], rng)
            idx = pool[int(rng.integers(len(pool)))]
            inst = make_instruction(self.samples[idx], task, rng)
            if inst is not None:
                out.append(inst)
        return out
