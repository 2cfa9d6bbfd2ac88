"""Where the build's parity images come from: the shared layout, any folder the user names,
or the sample images shipped with the package (a build never needs ../shared)."""
import json
import shutil

import numpy as np
import pytest

from earthgptx.errors import EarthGPTXError
from earthgptx.imageio import read_image


def _check(images):
    for item in images:
        h, w = read_image(item.path).data.shape[:2]
        assert item.mask.shape == (h, w) and item.mask.any()
        x0, y0, x1, y1 = item.box
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h


def test_shared_layout_gives_one_annotated_image_per_modality(data_root):
    from export.parity import parity_images

    images, where = parity_images(data_root)
    assert [i.modality for i in images] == ["infrared", "sar", "optical"] and str(data_root) in where
    _check(images)


def test_packaged_samples_are_real_readable_images_with_their_licences():
    from earthgptx.samples import SAMPLES_DIR
    from export.parity import parity_images

    images, where = parity_images(None)
    assert {i.modality for i in images} == {"optical", "sar"} and "no infrared" in where
    _check(images)
    licences = (SAMPLES_DIR / "README.md").read_text()
    for item in images:
        assert item.path.name in licences
        assert read_image(item.path).data.std() > 5  # a real image, not a constant
    assert "Apache License" in (SAMPLES_DIR / "LICENSE-APACHE-2.0.txt").read_text()


def test_a_users_folder_names_modalities_by_folder_or_file(tmp_path, data_root):
    from export.parity import parity_images

    (tmp_path / "sar").mkdir()
    shutil.copy(data_root / "sar" / "hrsid" / "P0094_0_800_3000_3800.png", tmp_path / "sar" / "a.png")
    shutil.copy(next((data_root / "optical" / "aid").rglob("*.jpg")), tmp_path / "rgb_scene.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    shutil.copy(next((data_root / "optical" / "aid").rglob("*.jpg")), tmp_path / "unnamed.jpg")
    images, where = parity_images(tmp_path)
    assert {i.modality: i.path.name for i in images} == {"sar": "a.png", "optical": "rgb_scene.jpg"}
    assert "none for infrared" in where
    _check(images)
    empty = tmp_path / "nothing"
    empty.mkdir()
    shutil.copy(tmp_path / "unnamed.jpg", empty / "x.jpg")
    with pytest.raises(EarthGPTXError, match="sar/scene.tif"):
        parity_images(empty)


def test_build_without_shared_imagery_uses_the_samples(tmp_path, monkeypatch, capfd):
    """No ../shared and no --data: the tiny build still checks parity (on the samples) and
    passes; its output has no foreign notes (the exporter's torchvision lines)."""
    from export.build import BuildError, BuildOptions, run_build

    monkeypatch.setenv("EGX_DATA", str(tmp_path / "absent"))
    out = tmp_path / "tiny"
    reports = run_build(BuildOptions(preset="tiny", out=out))
    printed = capfd.readouterr().err
    assert "parity images: the sample images shipped" in printed and "torchvision" not in printed
    assert all(r.parity["passed"] for r in reports)
    manifest = json.loads((out / "manifest.json").read_text())
    assert "sample images shipped" in manifest["parity_images"]
    with pytest.raises(BuildError, match="no such folder"):
        run_build(BuildOptions(preset="tiny", out=tmp_path / "x", data_root=tmp_path / "absent"))
    assert np.isfinite([r.parity["value"] for r in reports]).all()
