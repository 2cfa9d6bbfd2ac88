"""The calibration set: items (images or crops with their objects), the disjoint
calibration and evaluation sets, the object-size buckets the evaluation is reported in,
and the prompted requests drawn from an item's objects.

Reading a folder is ``calibration.listing`` (names first, then one image at a time);
choosing the sets is ``calibration.sampling``."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from earthgptx.data.templates import CLASSIFY_SCENE, CLASSIFY_VEHICLE
from earthgptx.errors import EarthGPTXError
from earthgptx.imageio import read_image
from earthgptx.processing import MODALITIES, VisualPrompts, crop_boxes, inside_point

MODALITY_WORDS = {"optical": ("optical", "rgb", "eo"), "sar": ("sar",), "infrared": ("infrared", "ir", "thermal")}
# COCO's object-size buckets, by object area in pixels of the original image: small < 32x32,
# medium < 96x96, large above; "none": an image without objects (a centre point/box is prompted)
SIZE_BUCKETS = (("small", 32 ** 2), ("medium", 96 ** 2), ("large", float("inf")))
NO_OBJECT = "none"


class CalibrationError(EarthGPTXError):
    """Not enough usable calibration imagery."""


@dataclass
class Item:
    """One image (or a crop of one) with its modality and objects (original frame of the crop):
    ``boxes`` ``(K, 4)`` float64 XYXY edges, ``masks`` ``(H, W)`` bool each (may be empty);
    ``dataset`` names where it came from, ``label`` is an image-level class where known."""

    path: Path
    modality: str
    crop: tuple[int, int, int, int] | None  # x0, y0, x1, y1 of the file, or None for all of it
    boxes: np.ndarray
    masks: list[np.ndarray] = field(default_factory=list)
    dataset: str = ""
    label: str | None = None

    @property
    def key(self) -> str:
        return f"{self.path}#{self.crop}" if self.crop else str(self.path)

    def image(self) -> np.ndarray:
        data = read_image(self.path).data
        if self.crop:
            x0, y0, x1, y1 = self.crop
            data = data[y0:y1, x0:x1]
        return data

    def object_area(self, j: int) -> float:
        """Area in pixels of object ``j`` (its mask where there is one, else its box)."""
        if self.masks:
            return float(np.count_nonzero(self.masks[j]))
        b = self.boxes[j]
        return float(max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1]))

    def size_buckets(self) -> set[str]:
        """The size buckets of the item's objects (``{"none"}`` without objects)."""
        return {size_bucket(self.object_area(j)) for j in range(len(self.boxes))} or {NO_OBJECT}


def size_bucket(area: float) -> str:
    for name, limit in SIZE_BUCKETS:
        if area < limit:
            return name
    return SIZE_BUCKETS[-1][0]


def modality_of(path: Path) -> str | None:
    words = {p.lower() for p in path.parts}
    for modality, names in MODALITY_WORDS.items():
        if words & set(names):
            return modality
    return None


def halves(item: Item) -> list[Item]:
    """Left and right halves of an item, each keeping the objects wholly inside it."""
    h, w = item.image().shape[:2]
    out = []
    for x0, x1 in ((0, w // 2), (w // 2, w)):
        keep = [i for i, b in enumerate(item.boxes) if b[0] >= x0 and b[2] <= x1]
        boxes = crop_boxes(item.boxes[keep], x0, 0)
        masks = [item.masks[i][:, x0:x1] for i in keep] if item.masks else []
        out.append(Item(item.path, item.modality, (x0, 0, x1, h), boxes, masks, item.dataset, item.label))
    return out


@dataclass
class CalibrationSet:
    """Disjoint ``calibration`` and ``evaluation`` items; ``skipped``: ``(path, reason)``;
    ``wanted``: the evaluation images per modality asked for, ``available``: the candidate
    images per modality and dataset that the folder holds."""

    calibration: list[Item]
    evaluation: list[Item]
    skipped: list[tuple[str, str]]
    seed: int
    wanted: int = 0
    available: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def sha256(self) -> str:
        h = hashlib.sha256(str(self.seed).encode())
        for tag, items in (("cal", self.calibration), ("eval", self.evaluation)):
            for it in items:
                h.update(f"{tag}:{it.key}:{it.modality}".encode())
        return h.hexdigest()

    def summary(self) -> dict:
        """Counts per modality, per dataset and per size bucket, and a note per modality
        whose evaluation set is smaller than asked for (the data has fewer images)."""
        count = lambda items: {m: sum(1 for i in items if i.modality == m) for m in MODALITIES}  # noqa: E731

        def breakdown(items):
            out: dict[str, dict] = {}
            for i in items:
                m = out.setdefault(i.modality, {"datasets": {}, "sizes": {}})
                m["datasets"][i.dataset] = m["datasets"].get(i.dataset, 0) + 1
                for b in i.size_buckets():
                    m["sizes"][b] = m["sizes"].get(b, 0) + 1
            return out

        ev = count(self.evaluation)
        notes = {m: f"{ev[m]} evaluation images, fewer than the {self.wanted} asked for: "
                    f"the folder has {sum(self.available.get(m, {}).values())} usable candidates of this modality"
                 for m in MODALITIES if m in self.available and ev[m] < self.wanted}
        return {"calibration_images": count(self.calibration), "evaluation_images": ev,
                "evaluation_wanted": self.wanted, "evaluation_breakdown": breakdown(self.evaluation),
                "calibration_breakdown": breakdown(self.calibration), "available": self.available,
                "notes": notes, "skipped": len(self.skipped), "sha256": self.sha256, "seed": self.seed,
                "images": {"calibration": [i.key for i in self.calibration], "evaluation": [i.key for i in self.evaluation]}}


def object_index(item: Item, k: int) -> int | None:
    """The object request ``k`` of ``item`` is drawn from (None: the item has none)."""
    return k % len(item.boxes) if len(item.boxes) else None


def request_bucket(item: Item, k: int) -> str:
    """The size bucket of request ``k``'s object (``"none"`` without objects)."""
    j = object_index(item, k)
    return NO_OBJECT if j is None else size_bucket(item.object_area(j))


def requests(item: Item, n: int, shape: tuple[int, int] | None = None) -> list[tuple[str, VisualPrompts, str]]:
    """``n`` (text, prompts, task) requests drawn from the item's objects: a point inside an
    object, its box, its mask as a free-form prompt, and templated grounding text. Items
    without objects get a centre point and a centre box. ``shape``: the item's ``(H, W)``
    where the caller knows it (else the image is read for it)."""
    h, w = shape or item.image().shape[:2]
    out = []
    for k in range(n):
        j = object_index(item, k)
        if j is not None:
            box = tuple(float(v) for v in item.boxes[j])
            point = inside_point(item.masks[j]) if item.masks else ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
            free = [item.masks[j]] if item.masks else []
        else:
            point, box, free = (w / 2, h / 2), (w / 4, h / 4, 3 * w / 4, 3 * h / 4), []
        kind = k % 3
        if kind == 0:
            out.append(("Segment <region1>.", VisualPrompts([point], [], []), "segment"))
        elif kind == 1:
            text = "What is in <region1> and <region2>?" if free else "What is in <region1>?"
            out.append((text, VisualPrompts([], [box], free), "region"))
        else:
            out.append(("Where is the object nearest the top-left corner?", VisualPrompts([], [], []), "grounding"))
    return out


# a classification question for items with an image-level label, per modality (MSTAR's chips are
# vehicles; AID's tiles and anything else are scenes): the training templates' first wording
CLASSIFY_QUESTION = {"sar": CLASSIFY_VEHICLE[0]}
CLASSIFY_DEFAULT = CLASSIFY_SCENE[0]
EVALUATION_REQUESTS = 3


def evaluation_requests(item: Item, shape: tuple[int, int] | None = None) -> list[tuple[str, VisualPrompts, str, str]]:
    """``(text, prompts, task, size bucket)`` asked of an evaluation item: a segmentation
    click, a region question and a grounding request drawn from its objects (``requests``),
    and a classification question where it has an image-level label."""
    out = [(*r, request_bucket(item, k)) for k, r in enumerate(requests(item, EVALUATION_REQUESTS, shape))]
    if item.label is not None:
        text = CLASSIFY_QUESTION.get(item.modality, CLASSIFY_DEFAULT)
        out.append((text, VisualPrompts([], [], []), "classify", request_bucket(item, 0)))
    return out
