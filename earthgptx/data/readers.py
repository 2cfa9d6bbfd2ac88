"""Readers for the annotation formats of the shared imagery (``../shared/data``):
SIRST (infrared: ``masks/<name>_pixels0.png``, one object per connected component, and
``masks/<name>.xml``), HRSID (SAR: instance colour PNGs), DOTA (optical: oriented boxes as 8
corners), and Pascal-VOC xml boxes anywhere. Each sample gives the image path, its modality,
and objects as XYXY edge boxes and ``(H, W)`` bool masks in the original frame. Problems in
the data are reported (``warnings`` and the caller's ``skipped`` list) and skipped, never raised.

Pascal-VOC ``<bndbox>`` values are 1-based inclusive pixel indices (VOC devkit); they become
0-based edges ``[xmin - 1, ymin - 1, xmax, ymax]``. Some writers use 0-based indices, so a box
may be off by one pixel either way (SIRST's files are, against their masks): boxes may poke
``VOC_TOLERANCE_PX`` beyond the image and are clipped to it; more than that is an error."""
from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import InputError
from ..imageio import read_image, read_mask
from ..processing import mask_box

log = logging.getLogger(__name__)

VOC_TOLERANCE_PX = 1.0  # off-by-one of 0- vs 1-based VOC writers
VOC_FOLDERS = ("Annotations", "annotations", "masks", "xml")  # beside the image folder, where VOC xml lives


@dataclass
class Sample:
    """One annotated image. ``boxes``/``masks`` are its objects (original frame);
    ``label`` is an image-level class (AID scene, MSTAR vehicle), ``captions`` its
    descriptions; ``noun`` names what the objects are ("ship", "target", "road") and
    ``instances`` says whether the objects are separate instances (False: ``masks`` holds
    one semantic mask, e.g. all roads). ``dataset`` names the reader that made it."""

    image: Path
    modality: str
    boxes: np.ndarray  # (K, 4) float64 XYXY edges, original frame
    masks: list[np.ndarray] = field(default_factory=list)  # (H, W) bool, one per object, may be empty
    dataset: str = ""
    label: str | None = None
    captions: tuple[str, ...] = ()
    noun: str = ""
    instances: bool = True
    object_classes: tuple[str, ...] = ()  # per object, where the data names them (DOTA)


@dataclass
class VocAnnotation:
    size: tuple[int, int] | None  # (W, H) from <size>; None where absent or written as 0
    boxes: np.ndarray  # (K, 4) float64 XYXY edges, 0-based


def _voc_size(root: ET.Element, path: Path) -> tuple[int, int] | None:
    size = root.find("size")
    if size is None:
        return None
    try:
        w, h = int(float(size.findtext("width", "0"))), int(float(size.findtext("height", "0")))
    except ValueError as exc:
        raise InputError(f"{path}: <size> width/height are not numbers ({exc}); fix or remove <size>") from exc
    return (w, h) if w > 0 and h > 0 else None


def _voc_box(obj: ET.Element, k: int, path: Path) -> list[float]:
    box = obj.find("bndbox")
    if box is None:
        raise InputError(f"{path}: <object> {k} has no <bndbox>")
    try:
        x0, y0, x1, y1 = (float(box.findtext(t)) for t in ("xmin", "ymin", "xmax", "ymax"))
    except (TypeError, ValueError) as exc:
        raise InputError(f"{path}: <object> {k}: <bndbox> needs numeric xmin, ymin, xmax and ymax") from exc
    if not (x0 <= x1 and y0 <= y1):  # also catches NaN
        raise InputError(f"{path}: <object> {k}: box ({x0}, {y0}, {x1}, {y1}) has xmax < xmin or ymax < ymin")
    return [x0 - 1, y0 - 1, x1, y1]


def read_voc(path: Path) -> VocAnnotation:
    """Pascal-VOC xml -> boxes as ``(K, 4)`` 0-based XYXY edges (module note on the convention).
    Raises ``InputError`` saying what is wrong for xml that does not parse, a root other than
    ``<annotation>``, or an ``<object>`` without a numeric, ordered ``<bndbox>``."""
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as exc:
        raise InputError(f"{path}: not readable Pascal-VOC xml ({exc})") from exc
    if root.tag != "annotation":
        raise InputError(f"{path}: root element is <{root.tag}>, Pascal-VOC xml has <annotation>")
    boxes = [_voc_box(obj, k, path) for k, obj in enumerate(root.findall("object"))]
    return VocAnnotation(_voc_size(root, path), np.asarray(boxes, dtype=np.float64).reshape(-1, 4))


def voc_file(image: Path, root: Path | None = None) -> Path | None:
    """The VOC xml of ``image``: ``<stem>.xml`` beside it, or in a folder of ``VOC_FOLDERS``
    beside its folder (``images/x.png`` -> ``Annotations/x.xml``), not above ``root``."""
    candidates = [image.with_suffix(".xml")] + [image.parent.parent / d / f"{image.stem}.xml" for d in VOC_FOLDERS]
    for c in candidates:
        if c.is_file() and (root is None or root in c.parents):
            return c
    return None


def voc_boxes(xml: Path, shape: tuple[int, int], skipped: list | None = None) -> np.ndarray | None:
    """Boxes ``(K, 4)`` of ``xml`` for an image of ``shape`` ``(H, W)``, clipped to it. Returns
    None, reported, for xml that cannot be read, says another image size, or has no box in the
    image; a box outside the image (beyond ``VOC_TOLERANCE_PX``) is reported and dropped."""
    try:
        ann = read_voc(xml)
    except InputError as exc:
        _skip(skipped, xml, str(exc))
        return None
    h, w = shape
    if ann.size is not None and ann.size != (w, h):
        _skip(skipped, xml, f"xml <size> says {ann.size[0]}x{ann.size[1]} but the image is {w}x{h}")
        return None
    t = VOC_TOLERANCE_PX
    b = ann.boxes
    inside = (b[:, 0] >= -t) & (b[:, 1] >= -t) & (b[:, 2] <= w + t) & (b[:, 3] <= h + t)
    clipped = np.clip(b, 0, [w, h, w, h])
    inside &= (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    for k in np.flatnonzero(~inside):
        _skip(skipped, xml, f"box {k} {tuple(b[k].round(1))} lies outside the {w}x{h} image")
    if len(b) and not inside.any():
        _skip(skipped, xml, "no box of the xml lies in the image")
        return None
    return clipped[inside]


def voc_sample(image: Path, xml: Path, modality: str, skipped: list | None = None) -> Sample | None:
    """An image annotated by VOC xml only: objects are its boxes (no masks); None, reported,
    for an unreadable image or unusable xml."""
    try:
        shape = read_image(image).data.shape[:2]
    except InputError as exc:
        _skip(skipped, image, str(exc))
        return None
    boxes = voc_boxes(xml, shape, skipped)
    return None if boxes is None else Sample(image, modality, boxes)


def voc_mask_disagreement(voc: np.ndarray, mask_boxes: np.ndarray) -> str | None:
    """Why VOC boxes ``(K, 4)`` and the boxes ``(M, 4)`` of mask objects (XYXY edges) do not
    describe the same objects, or None where they do. A VOC box may hold one object or a group (SIRST
    draws one box round all targets of an image): it must match the box enclosing the mask
    objects that lie in it, to ``VOC_TOLERANCE_PX`` per edge (plus 5 % of its side), and every
    mask object must lie in a VOC box."""
    covered = np.zeros(len(mask_boxes), dtype=bool)
    for k, box in enumerate(voc):
        tol = VOC_TOLERANCE_PX + 0.05 * np.array([box[2] - box[0], box[3] - box[1]] * 2)
        lo, hi = box - tol, box + tol
        inside = np.all((mask_boxes[:, :2] >= lo[:2]) & (mask_boxes[:, 2:] <= hi[2:]), axis=1)
        if not inside.any():
            return f"VOC box {k} {tuple(box.round(1))} holds no object of the mask"
        group = mask_boxes[inside]
        enclosing = np.concatenate([group[:, :2].min(0), group[:, 2:].max(0)])
        if np.any(np.abs(enclosing - box) > tol):
            return f"VOC box {k} {tuple(box.round(1))} does not fit its mask objects {tuple(enclosing.round(1))}"
        covered |= inside
    if not covered.all():
        j = int(np.flatnonzero(~covered)[0])
        return f"mask object {tuple(mask_boxes[j].round(1))} is in no VOC box"
    return None


def read_dota_polygons(path: Path) -> list[tuple[np.ndarray, str]]:
    """DOTA v1 label file -> ``[(corners (4, 2), class_name), ...]`` (header lines skipped)."""
    out = []
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) < 9:
            continue
        try:
            corners = np.asarray([float(v) for v in parts[:8]]).reshape(4, 2)
        except ValueError:
            continue
        out.append((corners, parts[8]))
    return out


def instance_masks(path: Path) -> list[np.ndarray]:
    """Instance-colour PNG (one colour per instance, black background) -> masks."""
    rgb = read_image(path).data
    if rgb.ndim == 2:
        rgb = rgb[:, :, None]
    flat = rgb.reshape(-1, rgb.shape[2])
    colours = np.unique(flat, axis=0)
    masks = []
    for c in colours:
        if not c.any():
            continue
        masks.append(np.all(rgb == c, axis=-1))
    return masks


def _skip(skipped: list | None, path: Path, why: str) -> None:
    log.warning("%s: %s, skipped", path, why)
    if skipped is not None:
        skipped.append((str(path), why))


def sirst_samples(root: Path, skipped: list | None = None, xml_dir: str = "masks",
                  dataset: str = "sirst") -> Iterator[Sample]:
    """SIRST layout: ``images/<name>.png`` + ``masks/<name>_pixels0.png`` and/or
    ``<xml_dir>/<name>.xml`` (SIRST: ``masks``; SIRST-v2: ``boxes``). Objects come from the
    mask (free-form prompts, points on the target) where there is one, checked against the
    xml boxes; from the xml boxes where there is no mask. An empty mask is an image without
    targets (SIRST-v2 has some). Problems go to ``skipped`` as ``(path, reason)``."""
    import cv2

    for img in sorted((root / "images").glob("*.png")):
        mask_path, xml = root / "masks" / f"{img.stem}_pixels0.png", root / xml_dir / f"{img.stem}.xml"
        if not mask_path.is_file():
            if xml.is_file():
                sample = voc_sample(img, xml, "infrared", skipped)
                if sample is not None:
                    sample.dataset, sample.noun = dataset, "target"
                    yield sample
            else:
                _skip(skipped, img, "no mask and no VOC xml")
            continue
        try:
            mask = read_mask(mask_path)
            shape = read_image(img).data.shape[:2]
        except InputError as exc:
            _skip(skipped, img, str(exc))
            continue
        if mask.shape != shape:
            _skip(skipped, img, f"mask is {mask.shape[1]}x{mask.shape[0]} but image is {shape[1]}x{shape[0]}")
            continue
        n, labels = cv2.connectedComponents(mask.astype(np.uint8))
        masks = [labels == i for i in range(1, n)]
        boxes = np.asarray([mask_box(m) for m in masks]).reshape(-1, 4)
        voc = voc_boxes(xml, shape, skipped) if xml.is_file() and masks else None  # unusable xml: reported
        why = voc_mask_disagreement(voc, boxes) if voc is not None and len(voc) else None
        if why:
            _skip(skipped, img, f"{xml.name} and {mask_path.name} disagree: {why}; fix or remove one")
            continue
        yield Sample(img, "infrared", boxes, masks, dataset=dataset, noun="target")


def sirst_v2_samples(root: Path, skipped: list | None = None) -> Iterator[Sample]:
    """SIRST-v2 layout: ``images/<name>.png``, ``masks/<name>_pixels0.png``, ``boxes/<name>.xml``."""
    return sirst_samples(root, skipped, xml_dir="boxes", dataset="sirst-v2")


def hrsid_samples(root: Path, skipped: list | None = None) -> Iterator[Sample]:
    """HRSID layout: ``<name>.png`` + ``<name>_instance_id_RGB.png``."""
    for img in sorted(root.glob("*.png")):
        if img.stem.endswith(("_instance_id_RGB", "_instance_color_RGB")):
            continue
        ann = root / f"{img.stem}_instance_id_RGB.png"
        try:
            masks = instance_masks(ann) if ann.is_file() else []
            shape = read_image(img).data.shape[:2]
        except InputError as exc:
            _skip(skipped, img, str(exc))
            continue
        if masks and masks[0].shape != shape:
            _skip(skipped, img, "instance mask size differs from the image")
            continue
        yield Sample(img, "sar", np.asarray([mask_box(m) for m in masks]).reshape(-1, 4), masks,
                     dataset="hrsid", noun="ship")


def colour_mask_samples(root: Path, modality: str, colour: tuple[int, int, int], dataset: str, noun: str,
                        instances: bool, skipped: list | None = None) -> Iterator[Sample]:
    """``images/<name>.*`` + ``masks/<name>.png`` where object pixels have ``colour`` (RGB)
    and the background is black. ``instances``: objects are the mask's connected
    components (ships); otherwise the mask is one semantic object (roads)."""
    import cv2

    for img in sorted(p for p in (root / "images").iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg")):
        ann = root / "masks" / f"{img.stem}.png"
        if not ann.is_file():
            _skip(skipped, img, f"no mask {ann.name}")
            continue
        try:
            rgb = read_image(ann).data
            shape = read_image(img).data.shape[:2]
        except InputError as exc:
            _skip(skipped, img, str(exc))
            continue
        if rgb.ndim != 3 or rgb.shape[:2] != shape:
            _skip(skipped, img, f"mask {ann.name} is not an RGB image of the image's size")
            continue
        # lossy writers blur the colour: nearest to the object colour rather than to black
        dist_obj = np.abs(rgb[..., :3].astype(np.int16) - np.array(colour, dtype=np.int16)).sum(-1)
        fg = dist_obj < rgb[..., :3].astype(np.int16).sum(-1)
        if instances:
            n, labels = cv2.connectedComponents(fg.astype(np.uint8))
            masks = [labels == i for i in range(1, n) if (labels == i).sum() >= 4]
        else:
            masks = [fg] if fg.any() else []
        yield Sample(img, modality, np.asarray([mask_box(m) for m in masks]).reshape(-1, 4), masks,
                     dataset=dataset, noun=noun, instances=instances)


def hrsid_mini_samples(root: Path, skipped: list | None = None) -> Iterator[Sample]:
    """HRSID chips with green ship masks (``images/*.jpg``, ``masks/*.png``, (0, 255, 0))."""
    return colour_mask_samples(root, "sar", (0, 255, 0), "hrsid-mini", "ship", True, skipped)


def road_samples(root: Path, skipped: list | None = None) -> Iterator[Sample]:
    """Aerial road tiles (``images/*.png``, ``masks/*.png``, roads (80, 120, 255)): one semantic mask."""
    return colour_mask_samples(root, "optical", (80, 120, 255), "road-mini", "road", False, skipped)


def dota_samples(root: Path, skipped: list | None = None) -> Iterator[Sample]:
    """DOTA layout: ``images/<name>.png`` + ``labelTxt/<name>.txt``."""
    import cv2

    for img in sorted((root / "images").glob("*.png")):
        label = root / "labelTxt" / f"{img.stem}.txt"
        polys = read_dota_polygons(label) if label.is_file() else []
        try:
            h, w = read_image(img).data.shape[:2]
        except InputError as exc:
            _skip(skipped, img, str(exc))
            continue
        masks, boxes, classes = [], [], []
        for corners, name in polys:
            m = np.zeros((h, w), dtype=np.uint8)
            cv2.fillPoly(m, [np.round(corners).astype(np.int32)], 1)
            if m.any():
                masks.append(m.astype(bool))
                boxes.append(mask_box(masks[-1]))
                classes.append(name.replace("-", " "))
        yield Sample(img, "optical", np.asarray(boxes).reshape(-1, 4), masks, dataset="dota", noun="object",
                     object_classes=tuple(classes))


def aid_samples(root: Path, skipped: list | None = None) -> Iterator[Sample]:
    """AID + RSICD captions: ``annotations.jsonl`` lines ``{"image", "class", "captions"}``.
    Images are not opened here (3,000 of them): a missing file is reported."""
    import json

    ann = root / "annotations.jsonl"
    if not ann.is_file():
        _skip(skipped, root, "no annotations.jsonl")
        return
    for n, line in enumerate(ann.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            img, label = root / rec["image"], str(rec["class"])
            captions = tuple(str(c).strip() for c in rec.get("captions", ()))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            _skip(skipped, ann, f"line {n}: {exc}")
            continue
        if not img.is_file():
            _skip(skipped, img, "listed in annotations.jsonl but missing")
            continue
        yield Sample(img, "optical", np.zeros((0, 4)), [], dataset="aid", label=label, captions=captions)


def mstar_samples(root: Path, skipped: list | None = None) -> Iterator[Sample]:
    """MSTAR chips, one folder per vehicle class (``<CLASS>/*.jpeg``); not opened here."""
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        for img in sorted(folder.iterdir()):
            if img.suffix.lower() in (".jpg", ".jpeg", ".png"):
                yield Sample(img, "sar", np.zeros((0, 4)), [], dataset="mstar", label=folder.name, noun="vehicle")


# dataset name -> (folder under the data root, reader); the layouts of ../shared/data
READERS = {
    "aid": ("optical/aid", aid_samples),
    "road-mini": ("optical/road-mini", road_samples),
    "dota": ("optical/dota", dota_samples),
    "mstar": ("sar/mstar", mstar_samples),
    "hrsid": ("sar/hrsid", hrsid_samples),
    "hrsid-mini": ("sar/hrsid-mini", hrsid_mini_samples),
    "sirst": ("infrared/sirst", sirst_samples),
    "sirst-v2": ("infrared/sirst-v2", sirst_v2_samples),
}


def dataset_samples(data_root: Path, names: tuple[str, ...] | None = None,
                    skipped: list | None = None) -> Iterator[Sample]:
    """Samples of the named datasets (default: every one found) under ``data_root``."""
    for name in names or tuple(READERS):
        if name not in READERS:
            raise InputError(f"unknown dataset {name!r}; known: {', '.join(READERS)}")
        folder, reader = READERS[name]
        path = Path(data_root) / folder
        if path.is_dir():
            yield from reader(path, skipped)


def shared_samples(data_root: Path, skipped: list | None = None) -> Iterator[Sample]:
    """The samples with objects of ``../shared/data`` that calibration uses: SIRST, HRSID, DOTA."""
    yield from sirst_samples(data_root / "infrared" / "sirst", skipped)
    yield from hrsid_samples(data_root / "sar" / "hrsid", skipped)
    yield from dota_samples(data_root / "optical" / "dota", skipped)
