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
from typing import Callable, Iterator

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
    """Instance-colour PNG (one colour per instance, black background) -> masks, in the
    order of their colours' packed values."""
    rgb = read_image(path).data
    if rgb.ndim == 2:
        rgb = rgb[:, :, None]
    bits = 8 * rgb.dtype.itemsize
    if rgb.dtype.kind != "u" or bits * rgb.shape[2] > 62:
        colours = np.unique(rgb.reshape(-1, rgb.shape[2]), axis=0)
        return [np.all(rgb == c, axis=-1) for c in colours if c.any()]
    packed = np.zeros(rgb.shape[:2], dtype=np.int64)
    for c in range(rgb.shape[2]):  # one integer per colour: np.unique over ints, not rows (10x faster)
        packed = (packed << bits) | rgb[..., c].astype(np.int64)
    return [packed == v for v in np.unique(packed) if v != 0]


def _skip(skipped: list | None, path: Path, why: str) -> None:
    log.warning("%s: %s, skipped", path, why)
    if skipped is not None:
        skipped.append((str(path), why))


def sirst_images(root: Path) -> list[Path]:
    """SIRST (and SIRST-v2) images, by name only: ``images/*.png``."""
    return sorted((root / "images").glob("*.png"))


def sirst_sample(root: Path, img: Path, skipped: list | None = None, xml_dir: str = "masks",
                 dataset: str = "sirst") -> Sample | None:
    """One SIRST image: objects from ``masks/<name>_pixels0.png`` (one per connected component,
    free-form prompts, points on the target) where there is a mask, checked against the xml
    boxes of ``<xml_dir>/<name>.xml``; from the xml boxes where there is no mask. An empty mask
    is an image without targets (SIRST-v2 has some). None, reported in ``skipped``, where the
    image cannot be used."""
    import cv2

    mask_path, xml = root / "masks" / f"{img.stem}_pixels0.png", root / xml_dir / f"{img.stem}.xml"
    if not mask_path.is_file():
        if not xml.is_file():
            _skip(skipped, img, "no mask and no VOC xml")
            return None
        sample = voc_sample(img, xml, "infrared", skipped)
        if sample is not None:
            sample.dataset, sample.noun = dataset, "target"
        return sample
    try:
        mask = read_mask(mask_path)
        shape = read_image(img).data.shape[:2]
    except InputError as exc:
        _skip(skipped, img, str(exc))
        return None
    if mask.shape != shape:
        _skip(skipped, img, f"mask is {mask.shape[1]}x{mask.shape[0]} but image is {shape[1]}x{shape[0]}")
        return None
    n, labels = cv2.connectedComponents(mask.astype(np.uint8))
    masks = [labels == i for i in range(1, n)]
    boxes = np.asarray([mask_box(m) for m in masks]).reshape(-1, 4)
    voc = voc_boxes(xml, shape, skipped) if xml.is_file() and masks else None  # unusable xml: reported
    why = voc_mask_disagreement(voc, boxes) if voc is not None and len(voc) else None
    if why:
        _skip(skipped, img, f"{xml.name} and {mask_path.name} disagree: {why}; fix or remove one")
        return None
    return Sample(img, "infrared", boxes, masks, dataset=dataset, noun="target")


def sirst_samples(root: Path, skipped: list | None = None, xml_dir: str = "masks",
                  dataset: str = "sirst") -> Iterator[Sample]:
    """SIRST layout: ``images/<name>.png`` + ``masks/<name>_pixels0.png`` and/or
    ``<xml_dir>/<name>.xml`` (SIRST: ``masks``; SIRST-v2: ``boxes``); see ``sirst_sample``.
    Problems go to ``skipped`` as ``(path, reason)``."""
    for img in sirst_images(root):
        if (sample := sirst_sample(root, img, skipped, xml_dir, dataset)) is not None:
            yield sample


def sirst_v2_samples(root: Path, skipped: list | None = None) -> Iterator[Sample]:
    """SIRST-v2 layout: ``images/<name>.png``, ``masks/<name>_pixels0.png``, ``boxes/<name>.xml``."""
    return sirst_samples(root, skipped, xml_dir="boxes", dataset="sirst-v2")


def sirst_v2_sample(root: Path, img: Path, skipped: list | None = None) -> Sample | None:
    return sirst_sample(root, img, skipped, xml_dir="boxes", dataset="sirst-v2")


def hrsid_images(root: Path) -> list[Path]:
    """HRSID chips by name: ``<name>.png`` that are not annotation PNGs."""
    return sorted(p for p in root.glob("*.png") if not p.stem.endswith(("_instance_id_RGB", "_instance_color_RGB")))


def hrsid_sample(root: Path, img: Path, skipped: list | None = None) -> Sample | None:
    """One HRSID chip with its instances from ``<name>_instance_id_RGB.png``."""
    ann = root / f"{img.stem}_instance_id_RGB.png"
    try:
        masks = instance_masks(ann) if ann.is_file() else []
        shape = read_image(img).data.shape[:2]
    except InputError as exc:
        _skip(skipped, img, str(exc))
        return None
    if masks and masks[0].shape != shape:
        _skip(skipped, img, "instance mask size differs from the image")
        return None
    return Sample(img, "sar", np.asarray([mask_box(m) for m in masks]).reshape(-1, 4), masks,
                  dataset="hrsid", noun="ship")


def hrsid_samples(root: Path, skipped: list | None = None) -> Iterator[Sample]:
    """HRSID layout: ``<name>.png`` + ``<name>_instance_id_RGB.png``."""
    for img in hrsid_images(root):
        if (sample := hrsid_sample(root, img, skipped)) is not None:
            yield sample


def colour_mask_images(root: Path) -> list[Path]:
    """``images/*.png|jpg|jpeg`` by name."""
    return sorted(p for p in (root / "images").iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))


def colour_mask_sample(root: Path, img: Path, modality: str, colour: tuple[int, int, int], dataset: str, noun: str,
                       instances: bool, skipped: list | None = None) -> Sample | None:
    """One ``images/<name>.*`` with ``masks/<name>.png`` where object pixels have ``colour``
    (RGB) and the background is black. ``instances``: objects are the mask's connected
    components (ships); otherwise the mask is one semantic object (roads)."""
    import cv2

    ann = root / "masks" / f"{img.stem}.png"
    if not ann.is_file():
        _skip(skipped, img, f"no mask {ann.name}")
        return None
    try:
        rgb = read_image(ann).data
        shape = read_image(img).data.shape[:2]
    except InputError as exc:
        _skip(skipped, img, str(exc))
        return None
    if rgb.ndim != 3 or rgb.shape[:2] != shape:
        _skip(skipped, img, f"mask {ann.name} is not an RGB image of the image's size")
        return None
    # lossy writers blur the colour: nearest to the object colour rather than to black
    dist_obj = np.abs(rgb[..., :3].astype(np.int16) - np.array(colour, dtype=np.int16)).sum(-1)
    fg = dist_obj < rgb[..., :3].astype(np.int16).sum(-1)
    if instances:
        n, labels = cv2.connectedComponents(fg.astype(np.uint8))
        masks = [labels == i for i in range(1, n) if (labels == i).sum() >= 4]
    else:
        masks = [fg] if fg.any() else []
    return Sample(img, modality, np.asarray([mask_box(m) for m in masks]).reshape(-1, 4), masks,
                  dataset=dataset, noun=noun, instances=instances)


def colour_mask_samples(root: Path, modality: str, colour: tuple[int, int, int], dataset: str, noun: str,
                        instances: bool, skipped: list | None = None) -> Iterator[Sample]:
    """Every image of a colour-mask layout (``colour_mask_sample``)."""
    for img in colour_mask_images(root):
        if (s := colour_mask_sample(root, img, modality, colour, dataset, noun, instances, skipped)) is not None:
            yield s


HRSID_MINI_COLOUR, ROAD_COLOUR = (0, 255, 0), (80, 120, 255)


def hrsid_mini_sample(root: Path, img: Path, skipped: list | None = None) -> Sample | None:
    return colour_mask_sample(root, img, "sar", HRSID_MINI_COLOUR, "hrsid-mini", "ship", True, skipped)


def road_sample(root: Path, img: Path, skipped: list | None = None) -> Sample | None:
    return colour_mask_sample(root, img, "optical", ROAD_COLOUR, "road-mini", "road", False, skipped)


def hrsid_mini_samples(root: Path, skipped: list | None = None) -> Iterator[Sample]:
    """HRSID chips with green ship masks (``images/*.jpg``, ``masks/*.png``, (0, 255, 0))."""
    return colour_mask_samples(root, "sar", HRSID_MINI_COLOUR, "hrsid-mini", "ship", True, skipped)


def road_samples(root: Path, skipped: list | None = None) -> Iterator[Sample]:
    """Aerial road tiles (``images/*.png``, ``masks/*.png``, roads (80, 120, 255)): one semantic mask."""
    return colour_mask_samples(root, "optical", ROAD_COLOUR, "road-mini", "road", False, skipped)


def dota_images(root: Path) -> list[Path]:
    """DOTA images by name: ``images/*.png``."""
    return sorted((root / "images").glob("*.png"))


def dota_sample(root: Path, img: Path, skipped: list | None = None) -> Sample | None:
    """One DOTA image with ``labelTxt/<name>.txt``: oriented boxes rasterised to masks."""
    import cv2

    label = root / "labelTxt" / f"{img.stem}.txt"
    polys = read_dota_polygons(label) if label.is_file() else []
    try:
        h, w = read_image(img).data.shape[:2]
    except InputError as exc:
        _skip(skipped, img, str(exc))
        return None
    masks, boxes, classes = [], [], []
    for corners, name in polys:
        m = np.zeros((h, w), dtype=np.uint8)
        cv2.fillPoly(m, [np.round(corners).astype(np.int32)], 1)
        if m.any():
            masks.append(m.astype(bool))
            boxes.append(mask_box(masks[-1]))
            classes.append(name.replace("-", " "))
    return Sample(img, "optical", np.asarray(boxes).reshape(-1, 4), masks, dataset="dota", noun="object",
                  object_classes=tuple(classes))


def dota_samples(root: Path, skipped: list | None = None) -> Iterator[Sample]:
    """DOTA layout: ``images/<name>.png`` + ``labelTxt/<name>.txt``."""
    for img in dota_images(root):
        if (sample := dota_sample(root, img, skipped)) is not None:
            yield sample


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


@dataclass(frozen=True)
class Layout:
    """One dataset layout, read in two steps so that a caller can sample before reading.
    ``names(root, skipped)``: the dataset's samples from file names (and a jsonl index) only,
    objects not yet read (``boxes`` empty, ``masks`` empty); no image or mask is opened.
    ``load(root, stub, skipped)``: the full sample of one stub (its annotations read, its
    image opened where the annotations need its size), or None, reported in ``skipped``."""

    folder: str  # under the data root
    modality: str
    names: Callable[[Path, list | None], list[Sample]]
    load: Callable[[Path, Sample, list | None], Sample | None]


def _stubs(images: Callable[[Path], list[Path]], modality: str, dataset: str):
    def names(root: Path, skipped: list | None = None) -> list[Sample]:
        return [Sample(p, modality, np.zeros((0, 4)), dataset=dataset) for p in images(root)]
    return names


def _per_image(one: Callable[[Path, Path, list | None], Sample | None]):
    def load(root: Path, stub: Sample, skipped: list | None = None) -> Sample | None:
        return one(root, stub.image, skipped)
    return load


def _as_listed(root: Path, stub: Sample, skipped: list | None = None) -> Sample:
    return stub  # image-level labels only: the listing is the whole sample


# dataset name -> layout; the same folders as READERS
LAYOUTS = {
    "aid": Layout("optical/aid", "optical", lambda r, s=None: list(aid_samples(r, s)), _as_listed),
    "road-mini": Layout("optical/road-mini", "optical", _stubs(colour_mask_images, "optical", "road-mini"),
                        _per_image(road_sample)),
    "dota": Layout("optical/dota", "optical", _stubs(dota_images, "optical", "dota"), _per_image(dota_sample)),
    "mstar": Layout("sar/mstar", "sar", lambda r, s=None: list(mstar_samples(r, s)), _as_listed),
    "hrsid": Layout("sar/hrsid", "sar", _stubs(hrsid_images, "sar", "hrsid"), _per_image(hrsid_sample)),
    "hrsid-mini": Layout("sar/hrsid-mini", "sar", _stubs(colour_mask_images, "sar", "hrsid-mini"),
                         _per_image(hrsid_mini_sample)),
    "sirst": Layout("infrared/sirst", "infrared", _stubs(sirst_images, "infrared", "sirst"), _per_image(sirst_sample)),
    "sirst-v2": Layout("infrared/sirst-v2", "infrared", _stubs(sirst_images, "infrared", "sirst-v2"),
                       _per_image(sirst_v2_sample)),
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
