"""Instructions -> tensors: the same pre-processing, prompt and feed layout as inference.

``encode(inst)`` turns one ``Instruction`` into arrays in the model frame, through
``processing`` (``preprocess``, ``Letterbox``, ``prompt_encoder_feed``, ``decoder_points``)
and ``prompting.build_prompt``, so that what is trained is what ``Predictor`` runs.
``collate`` pads a list of them into one batch. The constant system prefix of every
prompt (``prefix_ids``) is cut off here: the trainer feeds its KV once (the LLM is frozen).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..config import ModelConfig
from ..data.instructions import VISION_TASK, Instruction, click_prompt, clicks_on
from ..imageio import read_image
from ..processing import Letterbox, VisualPrompts, decoder_points, preprocess, prompt_encoder_feed
from ..prompting import IMAGE_TOKEN, SEG_TOKEN, build_prompt, region_token

IGNORE = -100
END_TOKEN = "<|im_end|>"
GEOMETRY_FREE = ("classify", "caption", "modality", "count", "presence")  # safe to flip
NO_TEXT = ("click", VISION_TASK)  # items that never reach the LLM


@dataclass
class Encoded:
    task: str
    pixel_values: np.ndarray  # (3, S, S) float32
    ids: np.ndarray  # (T,) int64 text ids after the system prefix; empty for click
    labels: np.ndarray  # (T,) int64, IGNORE except answer tokens
    seg_pos: int  # index in ids of the forced [SEG] (-1: none)
    prompts: dict[str, np.ndarray] | None  # prompt_encoder rows (1, R, ...) or None
    points: tuple[np.ndarray, np.ndarray] | None  # decoder (P, 2) coords, (P,) labels; None: no mask query
    target: np.ndarray | None  # (S, S) float32 coverage of the mask target
    label: int = -1  # image class index for the auxiliary head (-1: none)
    objects: np.ndarray | None = None  # (S, S) float32 coverage of all objects (auxiliary dense head)


class Encoder:
    """Callable ``Instruction -> Encoded`` for one model config and tokenizer."""

    def __init__(self, config: ModelConfig, tokenizer, augment: bool = True, seed: int = 0,
                 classes: dict[tuple[str, str], int] | None = None) -> None:
        self.config = config
        self.classes = classes or {}
        self.tokenizer = tokenizer
        self.augment = augment
        self.rng = np.random.default_rng(seed)
        self.size = config.vision.image_size
        full = self._ids(build_prompt("x", "optical", 0, False))
        self.prefix_ids = full[: self._prefix_len(full)]
        self.image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.seg_id = tokenizer.convert_tokens_to_ids(SEG_TOKEN)
        self.region_ids = [tokenizer.convert_tokens_to_ids(region_token(k + 1))
                           for k in range(config.prompt.max_regions)]
        self.end_ids = self._ids(END_TOKEN)

    def _ids(self, text: str) -> np.ndarray:
        return np.asarray(self.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)

    def _prefix_len(self, full: np.ndarray) -> int:
        user = self._ids("<|im_start|>user")
        for i in range(len(full) - len(user) + 1):
            if np.array_equal(full[i:i + len(user)], user):
                return i
        raise RuntimeError("the chat prompt has no user turn: prompting.build_prompt changed")

    def text_ids(self, inst: Instruction) -> tuple[np.ndarray, np.ndarray, int]:
        """``(ids, labels, seg_pos)`` after the system prefix."""
        prompt = self._ids(build_prompt(inst.text, inst.sample.modality, len(inst.prompts), inst.seg))
        if not np.array_equal(prompt[: len(self.prefix_ids)], self.prefix_ids):
            raise RuntimeError("a prompt does not start with the system prefix: check the tokenizer")
        prompt = prompt[len(self.prefix_ids):]
        answer = np.concatenate([self._ids((" " if inst.seg else "") + inst.answer), self.end_ids])
        ids = np.concatenate([prompt, answer])
        labels = np.concatenate([np.full(len(prompt), IGNORE, dtype=np.int64), answer])
        seg_pos = len(prompt) - 1 if inst.seg else -1
        return ids, labels, seg_pos

    def __call__(self, inst: Instruction, rng: np.random.Generator | None = None) -> Encoded:
        """``rng`` draws the augmentation (default: the encoder's own)."""
        rng = rng if rng is not None else self.rng
        s = inst.sample
        image = read_image(s.image).data
        masks = s.masks
        if self.augment and inst.task == VISION_TASK:
            image, masks = augment_geometry(image, masks, rng)
        prepared = preprocess(image, s.modality, self.size)
        lb: Letterbox = prepared.letterbox
        pv = prepared.pixel_values[0]
        flipped = self.augment and inst.task in GEOMETRY_FREE and rng.random() < 0.5
        if flipped:
            pv = pv.copy()
            pv[:, : lb.new_h, : lb.new_w] = pv[:, : lb.new_h, : lb.new_w][:, :, ::-1]
        if inst.task in NO_TEXT:
            ids = labels = np.zeros(0, dtype=np.int64)
            seg_pos = -1
        else:
            ids, labels, seg_pos = self.text_ids(inst)
        prompts = None
        if len(inst.prompts) and inst.task != "click":
            prompts = prompt_encoder_feed(inst.prompts, lb, self.config.prompt.mask_size)
        points = decoder_points(inst.prompts, lb) if (inst.seg or inst.task == "click") else None
        target = None
        if inst.target is not None:
            target = np.zeros((self.size, self.size), dtype=np.float32)
            if inst.target:
                union = np.zeros(s.masks[0].shape, dtype=bool)
                for k in inst.target:
                    union |= s.masks[k]
                target = lb.mask_coverage(union)
        if clicks_on(inst):
            points, target = self._vision_click(image, masks, lb, rng)
        label = self.classes.get((s.dataset, s.label), -1) if s.label else -1
        objects = object_coverage(s, masks, lb, self.size)
        if objects is not None and flipped:
            objects[: lb.new_h, : lb.new_w] = objects[: lb.new_h, : lb.new_w][:, ::-1].copy()
        return Encoded(inst.task, np.ascontiguousarray(pv), ids, labels, seg_pos, prompts, points, target, label,
                       objects)

    def _vision_click(self, image: np.ndarray, masks: list[np.ndarray], lb: Letterbox,
                      rng: np.random.Generator) -> tuple[tuple[np.ndarray, np.ndarray], np.ndarray]:
        """A click query on a ``VISION_TASK`` item (after its augmentation): a point or box on one
        object -> its mask; where the crop left no object, a point on the background -> nothing.
        Clicks need no LLM, so every vision item with objects trains the prompt-driven decoder."""
        alive = [k for k, m in enumerate(masks) if m.any()]
        if alive:
            k = alive[int(rng.integers(len(alive)))]
            return decoder_points(click_prompt(masks[k], rng), lb), lb.mask_coverage(masks[k])
        h, w = image.shape[:2]
        point = VisualPrompts([(float(rng.uniform(0, w)), float(rng.uniform(0, h)))], [], [])
        return decoder_points(point, lb), np.zeros((self.size, self.size), dtype=np.float32)


def object_coverage(sample, masks: list[np.ndarray], lb: Letterbox, size: int) -> np.ndarray | None:
    """``(size, size)`` float32 coverage of all of ``sample``'s objects (``masks``, in the frame
    ``lb`` maps) in the model frame: the target of the training-only dense head. Infrared images
    without a target give all background; images whose objects are not ships, infrared targets
    or roads give ``None`` (no target)."""
    if len(masks) and sample.noun in ("ship", "target", "road"):
        return lb.mask_coverage(np.logical_or.reduce(masks))
    if sample.dataset.startswith("sirst"):
        return np.zeros((size, size), dtype=np.float32)
    return None


def augment_geometry(image: np.ndarray, masks: list[np.ndarray], rng: np.random.Generator,
                     min_side: float = 0.7) -> tuple[np.ndarray, list[np.ndarray]]:
    """The same random square-angle rotation, mirror and crop (each side ``min_side``-1 of the
    image's, 80 % of the time) of an ``(H, W, C)`` image and its ``(H, W)`` bool masks, in the
    original frame: for ``VISION_TASK`` items, whose labels (a class, where the objects are)
    survive any of them. Overhead and SAR imagery has no "up"."""
    k, mirror = int(rng.integers(4)), bool(rng.random() < 0.5)
    h, w = image.shape[:2]
    y0, x0, ch, cw = 0, 0, h, w
    if rng.random() < 0.8:
        ch, cw = (max(8, int(round(d * rng.uniform(min_side, 1.0)))) for d in (h, w))
        y0, x0 = int(rng.integers(h - ch + 1)), int(rng.integers(w - cw + 1))

    def apply(a: np.ndarray) -> np.ndarray:
        a = np.rot90(a[y0:y0 + ch, x0:x0 + cw], k)
        return np.ascontiguousarray(a[:, ::-1] if mirror else a)

    return apply(image), [apply(m) for m in masks]


def point_groups(points: list[tuple[np.ndarray, np.ndarray]]) -> list[tuple[torch.Tensor, ...]]:
    """Mask queries' ``(P, 2)`` coordinates and ``(P,)`` labels, grouped by point count: a list of
    (rows into ``points``, ``(n, 1, P, 2)`` coordinates, ``(n, 1, P)`` labels). SAM attends to
    every point token, padding ones too: rows are never padded to a common point count, they are
    grouped by it (as at inference, where a query has its own points)."""
    groups: dict[int, list[int]] = {}
    for row, (_, labels) in enumerate(points):
        groups.setdefault(len(labels), []).append(row)
    return [(torch.tensor(rows, dtype=torch.long),
             torch.from_numpy(np.stack([points[r][0] for r in rows])[:, None]),
             torch.from_numpy(np.stack([points[r][1] for r in rows])[:, None]))
            for _, rows in sorted(groups.items())]


def collate(items: list[Encoded], pad_id: int) -> dict:
    """A batch: every image; text rows for the non-click items (right-padded); prompt rows
    for items with visual prompts (padded with ``PROMPT_PAD``); decoder queries for items
    with a mask target, in groups of equal point count (``point_groups``: rows into
    ``mask_rows``, ``(n, 1, P, 2)`` coordinates, ``(n, 1, P)`` labels)."""
    from ..prompt_encoder import PROMPT_PAD

    b = len(items)
    batch: dict = {"pixel_values": torch.from_numpy(np.stack([it.pixel_values for it in items])),
                   "tasks": [it.task for it in items]}
    text = [i for i, it in enumerate(items) if len(it.ids)]
    t = max((len(items[i].ids) for i in text), default=0)
    ids = np.full((len(text), t), pad_id, dtype=np.int64)
    labels = np.full((len(text), t), IGNORE, dtype=np.int64)
    valid = np.zeros((len(text), t), dtype=np.int64)
    for row, i in enumerate(text):
        n = len(items[i].ids)
        ids[row, :n], labels[row, :n], valid[row, :n] = items[i].ids, items[i].labels, 1
    batch.update(text_rows=torch.tensor(text, dtype=torch.long), ids=torch.from_numpy(ids),
                 labels=torch.from_numpy(labels), text_valid=torch.from_numpy(valid))

    pr = [i for i, it in enumerate(items) if it.prompts is not None]
    r = max((items[i].prompts["prompt_types"].shape[1] for i in pr), default=0)
    if pr:
        m = items[pr[0]].prompts["prompt_masks"].shape[-1]
        boxes = np.zeros((len(pr), r, 4), dtype=np.float32)
        types = np.full((len(pr), r), PROMPT_PAD, dtype=np.int64)
        masks = np.zeros((len(pr), r, m, m), dtype=np.float32)
        for row, i in enumerate(pr):
            p = items[i].prompts
            k = p["prompt_types"].shape[1]
            boxes[row, :k], types[row, :k], masks[row, :k] = p["prompt_boxes"][0], p["prompt_types"][0], p["prompt_masks"][0]
        batch.update(prompt_rows=torch.tensor(pr, dtype=torch.long), prompt_boxes=torch.from_numpy(boxes),
                     prompt_types=torch.from_numpy(types), prompt_masks=torch.from_numpy(masks))

    mq = [i for i, it in enumerate(items) if it.target is not None]
    if mq:
        batch["point_groups"] = point_groups([items[i].points for i in mq])
        seg_pos = [items[i].seg_pos for i in mq]
        batch.update(mask_rows=torch.tensor(mq, dtype=torch.long), seg_pos=torch.tensor(seg_pos, dtype=torch.long),
                     mask_vision=torch.tensor([items[i].task == VISION_TASK for i in mq], dtype=torch.bool),
                     targets=torch.from_numpy(np.stack([items[i].target for i in mq])))
    batch["labels_cls"] = torch.tensor([it.label for it in items], dtype=torch.long)
    ob = [i for i, it in enumerate(items) if it.objects is not None]
    if ob:
        batch.update(object_rows=torch.tensor(ob, dtype=torch.long),
                     objects=torch.from_numpy(np.stack([items[i].objects for i in ob])))
    batch["size"] = b
    return batch
