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

from .errors import InputError
from .imageio import read_image, read_mask
from .processing import mask_box

log = logging.getLogger(__name__)

VOC_TOLERANCE_PX = 1.0  # off-by-one of 0- vs 1-based VOC writers
VOC_FOLDERS = ("Annotations", "annotations", "masks", "xml")  # beside the image folder, where VOC xml lives


@dataclass
class Sample:
    image: Path
    modality: str
    boxes: np.ndarray  # (K, 4) float64 XYXY edges, original frame
    masks: list[np.ndarray] = field(default_factory=list)  # (H, W) bool, one per object, may be empty


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


def sirst_samples(root: Path, skipped: list | None = None) -> Iterator[Sample]:
    """SIRST layout: ``images/<name>.png`` + ``masks/<name>_pixels0.png`` and/or
    ``masks/<name>.xml``. Objects come from the mask (free-form prompts, points on the target)
    where there is one, checked against the xml boxes; from the xml boxes where there is no
    mask. Problems go to ``skipped`` as ``(path, reason)``."""
    import cv2

    for img in sorted((root / "images").glob("*.png")):
        mask_path, xml = root / "masks" / f"{img.stem}_pixels0.png", root / "masks" / f"{img.stem}.xml"
        if not mask_path.is_file():
            if xml.is_file():
                sample = voc_sample(img, xml, "infrared", skipped)
                if sample is not None:
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
        voc = voc_boxes(xml, shape, skipped) if xml.is_file() else None  # unusable xml: reported, mask kept
        why = voc_mask_disagreement(voc, boxes) if voc is not None else None
        if why:
            _skip(skipped, img, f"{xml.name} and {mask_path.name} disagree: {why}; fix or remove one")
            continue
        yield Sample(img, "infrared", boxes, masks)


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
        yield Sample(img, "sar", np.asarray([mask_box(m) for m in masks]).reshape(-1, 4), masks)


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
        masks, boxes = [], []
        for corners, _ in polys:
            m = np.zeros((h, w), dtype=np.uint8)
            cv2.fillPoly(m, [np.round(corners).astype(np.int32)], 1)
            if m.any():
                masks.append(m.astype(bool))
                boxes.append(mask_box(masks[-1]))
        yield Sample(img, "optical", np.asarray(boxes).reshape(-1, 4), masks)


def shared_samples(data_root: Path, skipped: list | None = None) -> Iterator[Sample]:
    """All samples of ``../shared/data`` (infrared, SAR, optical)."""
    yield from sirst_samples(data_root / "infrared" / "sirst", skipped)
    yield from hrsid_samples(data_root / "sar" / "hrsid", skipped)
    yield from dota_samples(data_root / "optical" / "dota", skipped)
