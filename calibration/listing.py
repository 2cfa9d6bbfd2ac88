"""What a calibration folder holds, by file name first: ``list_candidates`` walks the folder
and names every image with its dataset and modality without opening any image or
annotation (seconds for thousands of files); ``load`` reads one candidate's annotations and
checks that the image is usable. Sampling happens between the two (``calibration.sampling``).

Layouts: the datasets of ``earthgptx.data.readers.LAYOUTS`` where their folder is found
(``optical/aid``, ``sar/mstar``, ``infrared/sirst-v2``, ...), the SIRST, HRSID and DOTA
layouts under any other name (recognised by their files), and any other image (PNG, JPEG,
(Geo)TIFF) with the Pascal-VOC boxes of a ``<stem>.xml`` beside it or in an
``Annotations/`` (``annotations/``, ``masks/``, ``xml/``) folder beside its folder, or else
without annotations. Modality: ``modality`` if given, else a folder name on the path
(``optical``, ``sar``, ``infrared``/``ir``/``thermal``), else the layout's own."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from earthgptx.data.readers import LAYOUTS, Layout, Sample, voc_file, voc_sample
from earthgptx.errors import InputError
from earthgptx.imageio import IMAGE_SUFFIXES
from earthgptx.processing import MODALITIES, preprocess

from .dataset import CalibrationError, Item, modality_of

ANNOTATION_MARKS = ("_pixels0", "_instance_id_RGB", "_instance_color_RGB")
ANNOTATION_FOLDERS = ("masks", "labelTxt", "boxes", "Annotations", "annotations", "xml")


@dataclass
class Candidate:
    """An image known by name only: ``stub`` has its path, dataset and modality (and an
    image-level label where the listing gives one); ``loader(root, stub, skipped)`` reads it."""

    stub: Sample
    root: Path
    loader: Callable[[Path, Sample, list | None], Sample | None]

    @property
    def dataset(self) -> str:
        return self.stub.dataset

    @property
    def modality(self) -> str:
        return self.stub.modality


def _layout_of(folder: Path, rel: str) -> tuple[str, Layout] | None:
    """The layout of ``folder`` (``rel``: its path under the calibration root's parent)."""
    for name, layout in LAYOUTS.items():
        if rel == layout.folder or rel.endswith("/" + layout.folder):
            return name, layout
    images, masks = folder / "images", folder / "masks"
    if images.is_dir() and masks.is_dir() and any(masks.glob("*_pixels0.png")):
        return ("sirst-v2", LAYOUTS["sirst-v2"]) if (folder / "boxes").is_dir() else ("sirst", LAYOUTS["sirst"])
    if any(folder.glob("*_instance_id_RGB.png")):
        return "hrsid", LAYOUTS["hrsid"]
    if images.is_dir() and (folder / "labelTxt").is_dir():
        return "dota", LAYOUTS["dota"]
    return None


def _generic_loader(root: Path):
    def load(_: Path, stub: Sample, skipped: list | None = None) -> Sample | None:
        xml = voc_file(stub.image, root)
        if xml is None:
            return stub
        sample = voc_sample(stub.image, xml, stub.modality, skipped)
        if sample is not None:
            sample.dataset = stub.dataset
        return sample
    return load


def list_candidates(root: str | Path, modality: str | None = None) -> tuple[list[Candidate], list[tuple[str, str]]]:
    """Every image under ``root`` as a ``Candidate`` (sorted by path), and the ``(path,
    reason)`` of images that cannot be used whatever is sampled (no modality). Reads file
    names (and a dataset's jsonl index) only."""
    root = Path(root)
    if not root.is_dir():
        raise CalibrationError(f"calibration folder not found: {root}")
    if modality is not None and modality not in MODALITIES:
        raise CalibrationError(f"modality {modality!r} is not one of {', '.join(MODALITIES)}")
    base = root.resolve().parent
    out: list[Candidate] = []
    skipped: list[tuple[str, str]] = []
    for folder, dirs, files in os.walk(root):
        d = Path(folder)
        dirs.sort()
        rel = d.resolve().relative_to(base).as_posix()
        found = _layout_of(d, rel)
        if found is not None:
            name, layout = found
            mod = modality or modality_of(Path(rel)) or layout.modality
            for stub in layout.names(d, skipped):
                stub.modality = mod
                out.append(Candidate(stub, d, layout.load))
            dirs[:] = []  # the layout owns everything below it
            continue
        if d.name in ANNOTATION_FOLDERS:
            continue
        for f in sorted(files):
            p = d / f
            if p.suffix.lower() not in IMAGE_SUFFIXES or any(m in p.stem for m in ANNOTATION_MARKS):
                continue
            mod = modality or modality_of(Path(rel))
            if mod is None:
                skipped.append((str(p), "modality unknown: put it under a folder named optical, sar or infrared"))
                continue
            dataset = d.resolve().relative_to(root.resolve()).as_posix()  # "." for root itself
            out.append(Candidate(Sample(p, mod, np.zeros((0, 4)), dataset=dataset), root, _generic_loader(root)))
    return out, skipped


def load(candidate: Candidate, skipped: list) -> Item | None:
    """The candidate's item with its objects, or None (reason appended to ``skipped``) where
    its annotations are unusable, its image unreadable or of a kind its modality cannot take."""
    sample = candidate.loader(candidate.root, candidate.stub, skipped)
    if sample is None:
        return None
    item = Item(sample.image, candidate.modality, None, sample.boxes, list(sample.masks),
                dataset=candidate.dataset, label=sample.label)
    try:
        preprocess(item.image(), item.modality, 64)  # readable, and the modality can take it
    except InputError as exc:
        skipped.append((str(item.path), str(exc)))
        return None
    return item


def discover(root: str | Path, modality: str | None = None) -> tuple[list[Item], list[tuple[str, str]]]:
    """Every usable item under ``root`` and the ``(path, reason)`` of everything skipped.
    Reads every image: for small folders and tests; a build samples first (``choose``)."""
    candidates, skipped = list_candidates(root, modality)
    items = [i for c in candidates if (i := load(c, skipped)) is not None]
    return items, skipped
