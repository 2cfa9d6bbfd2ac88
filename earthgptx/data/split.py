"""The validation split: which images training may never see.

Rules, in order (deterministic, independent of the order files are found in):
* ``sar/hrsid`` (3 chips with instance masks, the README's SAR example among them) is
  validation only, so that the README's first answer is on an image the model never saw;
* SIRST: the dataset's own ``idx_427/test.txt`` is validation (the field's split);
* everything else: an image is validation when a hash of its path relative to its
  dataset folder falls below ``VAL_FRACTION`` (stratified per class folder by
  construction: every class loses about the same share).
A validation image never enters training under any task: the split is by image.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from .readers import READERS, Sample

VAL_FRACTION = 0.15
VAL_ONLY = ("hrsid",)


def _hash_fraction(key: str) -> float:
    digest = hashlib.sha1(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _sirst_test_names(data_root: Path) -> set[str]:
    path = data_root / READERS["sirst"][0] / "idx_427" / "test.txt"
    return set(path.read_text().split()) if path.is_file() else set()


class Splitter:
    """``split(sample) -> "train" | "val"`` for samples under ``data_root``."""

    def __init__(self, data_root: Path, val_fraction: float = VAL_FRACTION) -> None:
        self.data_root = Path(data_root)
        self.val_fraction = val_fraction
        self.sirst_test = _sirst_test_names(self.data_root)

    def __call__(self, sample: Sample) -> str:
        if sample.dataset in VAL_ONLY:
            return "val"
        if sample.dataset == "sirst" and self.sirst_test:
            return "val" if sample.image.stem in self.sirst_test else "train"
        folder = READERS.get(sample.dataset, ("", None))[0]
        try:
            rel = sample.image.relative_to(self.data_root / folder).as_posix()
        except ValueError:
            rel = sample.image.name
        return "val" if _hash_fraction(f"{sample.dataset}/{rel}") < self.val_fraction else "train"
