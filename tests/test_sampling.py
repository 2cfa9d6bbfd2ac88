"""Choosing the INT8 calibration and evaluation sets over a folder of thousands of images:
names are listed first, only the sampled images are read, the evaluation set is stratified
by dataset and object size, and a modality with too few images is said to have them."""
import time
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest

from calibration import dataset
from calibration.dataset import CalibrationError, SIZE_BUCKETS, size_bucket
from calibration.sampling import LOOKAHEAD, choose, water_fill


def _voc(w: int, h: int, box: tuple[int, int, int, int]) -> str:
    return (f"<annotation><size><width>{w}</width><height>{h}</height><depth>3</depth></size><object><name>t"
            f"</name><bndbox><xmin>{box[0]}</xmin><ymin>{box[1]}</ymin><xmax>{box[2]}</xmax><ymax>{box[3]}</ymax>"
            "</bndbox></object></annotation>")


@pytest.fixture(scope="module")
def big_folder(tmp_path_factory) -> Path:
    """3,000 small images: optical (2 datasets of 1,000, one with VOC boxes of every size
    bucket), sar (1 dataset of 988), infrared (12 images: fewer than 30)."""
    root = tmp_path_factory.mktemp("many") / "data"
    rng = np.random.default_rng(0)
    rgb = (rng.random((160, 160, 3)) * 255).astype(np.uint8)
    grey = rgb[..., 0]
    layout = {"optical/scenes": (1000, rgb, None), "optical/boxed": (1000, rgb, "voc"),
              "sar/chips": (988, grey, None), "infrared/few": (12, grey, None)}
    boxes = [(10, 10, 20, 20), (10, 10, 60, 60), (1, 1, 150, 150)]  # small, medium, large (1-based VOC)
    for folder, (n, img, ann) in layout.items():
        d = root / folder
        d.mkdir(parents=True)
        ok, png = cv2.imencode(".png", img)
        for i in range(n):
            (d / f"{i:04d}.png").write_bytes(png.tobytes())
            if ann:
                (d / f"{i:04d}.xml").write_text(_voc(160, 160, boxes[i % 3]))
    return root


def test_thousands_of_images_only_the_sampled_ones_are_read(big_folder, monkeypatch):
    import earthgptx.data.readers as readers

    reads = Counter()
    for module in (dataset, readers):  # every image read goes through one of these two
        def counting(path, *a, _original=module.read_image, **k):
            reads[str(path)] += 1
            return _original(path, *a, **k)
        monkeypatch.setattr(module, "read_image", counting)
    start = time.perf_counter()
    s = choose(big_folder, seed=0)
    seconds = time.perf_counter() - start
    chosen = {str(i.path) for i in s.calibration + s.evaluation}
    assert chosen <= set(reads)  # every chosen image was checked once read
    # nothing else was read but a few look-ahead images per dataset
    assert len(set(reads) - chosen) <= LOOKAHEAD * 4, sorted(set(reads) - chosen)
    assert len(reads) < 120 and seconds < 20, (len(reads), seconds)  # of 3,000 files
    summary = s.summary()
    assert summary["evaluation_images"] == {"optical": 30, "sar": 30, "infrared": 9}
    assert summary["calibration_images"] == {"optical": 8, "sar": 8, "infrared": 3}
    assert not {i.key for i in s.calibration} & {i.key for i in s.evaluation}
    ev = summary["evaluation_breakdown"]
    assert ev["optical"]["datasets"] == {"optical/boxed": 15, "optical/scenes": 15}
    sizes = ev["optical"]["sizes"]  # the boxed dataset's 15 spread over the three size buckets
    assert sizes["none"] == 15 and all(sizes[b] >= 4 for b in ("small", "medium", "large")), sizes
    assert set(summary["notes"]) == {"infrared"} and "9 evaluation images, fewer than the 30" in summary["notes"]["infrared"]
    assert summary["available"]["sar"] == {"sar/chips": 988}


def test_size_buckets_are_cocos():
    assert [name for name, _ in SIZE_BUCKETS] == ["small", "medium", "large"]
    assert [size_bucket(a) for a in (0, 31 * 33, 32 * 32, 95 * 96, 96 * 96, 1e6)] == \
        ["small", "small", "medium", "medium", "large", "large"]


def test_quotas_spread_over_datasets():
    assert water_fill({"a": 1, "b": 50, "c": 50}, 9) == {"a": 1, "b": 4, "c": 4}
    assert water_fill({"a": 2, "b": 3}, 30) == {"a": 2, "b": 3}
    assert water_fill({}, 5) == {}


def test_a_dataset_that_runs_dry_leaves_its_share_to_the_others(tmp_path):
    rng = np.random.default_rng(0)
    for folder, n in (("sar/good", 40), ("sar/bad", 20)):
        (tmp_path / folder).mkdir(parents=True)
        for i in range(n):
            path = tmp_path / folder / f"{i}.png"
            if folder.endswith("bad") and i >= 2:
                path.write_bytes(b"not an image")
            else:
                cv2.imwrite(str(path), (rng.random((32, 32)) * 255).astype(np.uint8))
    s = choose(tmp_path)
    assert s.summary()["evaluation_images"]["sar"] == 30  # 15 wanted of "bad", 2 usable: "good" tops up
    assert sum(1 for _, why in s.skipped if "cannot read" in why) >= 1


def test_at_least_one_image_per_set(tmp_path):
    with pytest.raises(CalibrationError, match="at least one evaluation"):
        choose(tmp_path, evaluation=0)
