"""A calibration set from a folder of real imagery.

Known layouts anywhere under the folder are read with their annotations: SIRST
(``images/`` + ``masks/*_pixels0.png`` and/or ``masks/*.xml``), HRSID
(``*_instance_id_RGB.png``), DOTA (``images/`` + ``labelTxt/``). Any other image (PNG, JPEG,
(Geo)TIFF) is used with the Pascal-VOC boxes of a ``<stem>.xml`` beside it or in an
``Annotations/`` (``annotations/``, ``masks/``, ``xml/``) folder beside its folder, or else
without annotations; its modality is read from a folder name on its path (``optical``,
``sar``, ``infrared``/``ir``/``thermal``) or given by the caller. Where a mask and VOC boxes
both exist the mask gives the prompts and the boxes must agree with it. Unreadable images,
images the modality cannot take, masks or xml that do not fit their image, malformed xml and
annotations that disagree are reported and skipped.

Selection is per modality, seeded and deterministic: disjoint calibration and evaluation
images (a modality with a single image is split into left/right halves so that the two
never share pixels), and the same number of prompted requests for every modality."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from earthgptx.data.readers import dota_samples, hrsid_samples, sirst_samples, voc_file, voc_sample
from earthgptx.errors import EarthGPTXError, InputError
from earthgptx.imageio import read_image
from earthgptx.processing import MODALITIES, VisualPrompts, crop_boxes, inside_point, preprocess

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
MODALITY_WORDS = {"optical": ("optical", "rgb", "eo"), "sar": ("sar",), "infrared": ("infrared", "ir", "thermal")}
ANNOTATION_MARKS = ("_pixels0", "_instance_id_RGB", "_instance_color_RGB")


class CalibrationError(EarthGPTXError):
    """Not enough usable calibration imagery."""


@dataclass
class Item:
    """One image (or a crop of one) with its modality and objects (original frame of the crop)."""

    path: Path
    modality: str
    crop: tuple[int, int, int, int] | None  # x0, y0, x1, y1 of the file, or None for all of it
    boxes: np.ndarray
    masks: list[np.ndarray] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.path}#{self.crop}" if self.crop else str(self.path)

    def image(self) -> np.ndarray:
        data = read_image(self.path).data
        if self.crop:
            x0, y0, x1, y1 = self.crop
            data = data[y0:y1, x0:x1]
        return data


def modality_of(path: Path) -> str | None:
    words = {p.lower() for p in path.parts}
    for modality, names in MODALITY_WORDS.items():
        if words & set(names):
            return modality
    return None


def discover(root: str | Path, modality: str | None = None) -> tuple[list[Item], list[tuple[str, str]]]:
    """Usable items under ``root`` and the ``(path, reason)`` of everything skipped."""
    root = Path(root)
    if not root.is_dir():
        raise CalibrationError(f"calibration folder not found: {root}")
    skipped: list[tuple[str, str]] = []
    items: list[Item] = []
    claimed: set[Path] = set()

    def add(samples, folder: Path, default: str) -> None:
        mod = modality or modality_of(folder.relative_to(root.parent)) or default
        for s in samples:
            items.append(Item(s.image, mod, None, s.boxes, s.masks))
        claimed.add(folder)

    for d in sorted([root, *[p for p in root.rglob("*") if p.is_dir()]]):
        if (d / "images").is_dir() and (d / "masks").is_dir() and any((d / "masks").glob("*_pixels0.png")):
            add(sirst_samples(d, skipped), d, "infrared")
        elif any(d.glob("*_instance_id_RGB.png")):
            add(hrsid_samples(d, skipped), d, "sar")
        elif (d / "images").is_dir() and (d / "labelTxt").is_dir():
            add(dota_samples(d, skipped), d, "optical")
    for f in sorted(root.rglob("*")):
        if f.suffix.lower() not in IMAGE_SUFFIXES or any(c in f.parents or c == f.parent for c in claimed):
            continue
        if any(m in f.stem for m in ANNOTATION_MARKS) or "masks" in f.parts:
            continue
        mod = modality or modality_of(f.relative_to(root.parent))
        if mod is None:
            skipped.append((str(f), "modality unknown: put it under a folder named optical, sar or infrared"))
            continue
        xml = voc_file(f, root)
        if xml is None:
            items.append(Item(f, mod, None, np.zeros((0, 4))))
        elif (sample := voc_sample(f, xml, mod, skipped)) is not None:
            items.append(Item(sample.image, mod, None, sample.boxes))
    usable = []
    for item in items:
        if item.modality not in MODALITIES:
            skipped.append((str(item.path), f"unknown modality {item.modality!r}"))
            continue
        try:
            preprocess(item.image(), item.modality, 64)  # readable, and the modality can take it
        except InputError as exc:
            skipped.append((str(item.path), str(exc)))
            continue
        usable.append(item)
    return usable, skipped


def halves(item: Item) -> list[Item]:
    """Left and right halves of an item, each keeping the objects wholly inside it."""
    h, w = item.image().shape[:2]
    out = []
    for x0, x1 in ((0, w // 2), (w // 2, w)):
        keep = [i for i, b in enumerate(item.boxes) if b[0] >= x0 and b[2] <= x1]
        boxes = crop_boxes(item.boxes[keep], x0, 0)
        masks = [item.masks[i][:, x0:x1] for i in keep] if item.masks else []
        out.append(Item(item.path, item.modality, (x0, 0, x1, h), boxes, masks))
    return out


@dataclass
class CalibrationSet:
    calibration: list[Item]
    evaluation: list[Item]
    skipped: list[tuple[str, str]]
    seed: int

    @property
    def sha256(self) -> str:
        h = hashlib.sha256(str(self.seed).encode())
        for tag, items in (("cal", self.calibration), ("eval", self.evaluation)):
            for it in items:
                h.update(f"{tag}:{it.key}:{it.modality}".encode())
        return h.hexdigest()

    def summary(self) -> dict:
        count = lambda items: {m: sum(1 for i in items if i.modality == m) for m in MODALITIES}  # noqa: E731
        return {"calibration_images": count(self.calibration), "evaluation_images": count(self.evaluation),
                "skipped": len(self.skipped), "sha256": self.sha256, "seed": self.seed}


def select(items: list[Item], skipped, images_per_modality: int = 8, eval_per_modality: int = 2,
           seed: int = 0, min_images: int = 2) -> CalibrationSet:
    """Disjoint calibration/evaluation items per modality, chosen by ``seed``."""
    rng = np.random.default_rng(seed)
    cal, ev = [], []
    present = sorted({i.modality for i in items})
    if not present:
        raise CalibrationError(f"no usable calibration image ({len(skipped)} skipped); at least {min_images} "
                               "images of a modality are needed (or one that can be split in halves)")
    for m in present:
        pool = [i for i in items if i.modality == m]
        if len(pool) < min_images:
            pool = [h for i in pool for h in halves(i)]
        order = rng.permutation(len(pool))
        n_eval = min(eval_per_modality, max(1, len(pool) // 3))
        ev += [pool[j] for j in order[:n_eval]]
        cal += [pool[j] for j in order[n_eval:n_eval + images_per_modality]]
        if len(pool) - n_eval < 1:
            raise CalibrationError(f"{m}: {len(pool)} usable image(s), need at least {min_images}")
    return CalibrationSet(cal, ev, skipped, seed)


def requests(item: Item, n: int) -> list[tuple[str, VisualPrompts, str]]:
    """``n`` (text, prompts, task) requests drawn from the item's objects: a point inside an
    object, its box, its mask as a free-form prompt, and templated grounding text. Items
    without objects get a centre point and a centre box."""
    h, w = item.image().shape[:2]
    out = []
    for k in range(n):
        if len(item.boxes):
            j = k % len(item.boxes)
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
