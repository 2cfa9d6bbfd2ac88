"""Pre/post-processing: modality scaling, the pad-to-square transform and its inverse
on the real shared imagery, and the errors bad input gets."""
import itertools
import logging

import cv2
import numpy as np
import pytest

from earthgptx.data.readers import shared_samples, sirst_samples
from earthgptx.errors import InputError
from earthgptx.imageio import read_image
from earthgptx.processing import (PIXEL_MEAN, PIXEL_STD, Letterbox, VisualPrompts, format_box,
                                  parse_text_boxes, preprocess, zoom_factor, zoom_window)

S = 448


def _samples(data_root):
    """Every SAR and optical sample and every 40th infrared one, with the odd PNG modes."""
    out = []
    for i, s in enumerate(shared_samples(data_root)):
        if s.modality != "infrared" or i % 40 == 0 or s.image.stem in ("Misc_1", "Misc_10", "Misc_138"):
            out.append(s)
    return out


def test_every_modality_preprocesses(data_root):
    seen = set()
    for s in _samples(data_root):
        img = read_image(s.image).data
        prep = preprocess(img, s.modality, S)
        assert prep.pixel_values.shape == (1, 3, S, S) and prep.pixel_values.dtype == np.float32
        assert np.isfinite(prep.pixel_values).all()
        lb = prep.letterbox
        # the padding normalises to exactly 0 and the content does not
        assert np.all(prep.pixel_values[0, :, lb.new_h:, :] == 0) and np.all(prep.pixel_values[0, :, :, lb.new_w:] == 0)
        assert np.abs(prep.pixel_values[0, :, : lb.new_h, : lb.new_w]).max() > 0
        seen.add((s.modality, img.ndim == 3 and img.shape[2]))
    # grey infrared as L, RGB and RGBA PNGs, 3-channel SAR, RGB optical
    assert {("infrared", False), ("infrared", 3), ("infrared", 4), ("sar", 3), ("optical", 3)} <= seen


def test_palette_png_is_read_as_grey(data_root):
    img = read_image(data_root / "infrared/sirst/images/Misc_138.png").data  # a P-mode PNG
    prep = preprocess(img, "infrared", S)
    unit = prep.pixel_values[0].transpose(1, 2, 0) * PIXEL_STD + PIXEL_MEAN
    content = unit[: prep.letterbox.new_h, : prep.letterbox.new_w]
    assert np.allclose(content[..., 0], content[..., 1], atol=1e-5) and content.std() > 0.01


def test_point_and_box_round_trip_exactly(data_root):
    for s in _samples(data_root):
        h, w = read_image(s.image).data.shape[:2]
        lb = Letterbox(h, w, S)
        pts = np.array([[0, 0], [w - 1, h - 1], [w / 3, h / 2]])
        np.testing.assert_allclose(lb.points_from_model(lb.points_to_model(pts)), pts, atol=1e-9)
        if len(s.boxes):
            np.testing.assert_allclose(lb.boxes_from_model(lb.boxes_to_model(s.boxes)), s.boxes, atol=1e-9)
            np.testing.assert_allclose(lb.boxes_from_normalized(lb.boxes_to_normalized(s.boxes)), s.boxes, atol=1e-9)
            assert np.all(lb.boxes_to_normalized(s.boxes) <= 1.0 + 1e-12)
        # a point stays on the object it was in (within one model pixel)
        model_pts = lb.points_to_model(pts)
        assert np.all((model_pts[:, 0] < lb.new_w) & (model_pts[:, 1] < lb.new_h))


def _boundary_distance(mask: np.ndarray) -> np.ndarray:
    inside = cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, 3)
    outside = cv2.distanceTransform((~mask).astype(np.uint8), cv2.DIST_L2, 3)
    return np.maximum(inside, outside)


def test_masks_round_trip_within_one_pixel(data_root):
    """Original mask -> model frame -> original: every changed pixel lies within one model
    pixel (1 / scale original pixels, and at least 1) of the object's boundary."""
    checked = 0
    for s in _samples(data_root):
        if not s.masks:
            continue
        h, w = s.masks[0].shape
        lb = Letterbox(h, w, S)
        tol = 1.0 / lb.scale + 1.0  # one model pixel, in original pixels, plus one original pixel
        for m in s.masks[:10]:
            model = lb.mask_to_model(m)
            logits = np.where(model > 0, 1.0, -1.0).astype(np.float32)
            back = lb.mask_from_model(logits)
            changed = back != m
            if changed.any():
                assert _boundary_distance(m)[changed].max() <= tol, s.image.name
            assert back.any()
            checked += 1
    assert checked > 50


def test_mismatched_sirst_mask_is_skipped_with_warning(data_root, caplog):
    with caplog.at_level(logging.WARNING):
        names = [s.image.stem for s in sirst_samples(data_root / "infrared/sirst")]
    assert "Misc_111" not in names and len(names) == 426
    assert any("Misc_111" in r.message for r in caplog.records)


def test_sixteen_bit_and_float_inputs():
    rng = np.random.default_rng(0)
    opt16 = (rng.random((300, 500, 3)) * 4095).astype(np.uint16)
    ir16 = (rng.random((240, 320)) * 16383).astype(np.uint16)
    ir16[100, 100] = 16383 * 4  # a hot target
    sar_f = rng.gamma(1.0, 1.0, (256, 256)).astype(np.float32)
    slc = (rng.normal(size=(128, 128)) + 1j * rng.normal(size=(128, 128))).astype(np.complex64)
    for img, mod in [(opt16, "optical"), (ir16, "infrared"), (sar_f, "sar"), (slc, "sar")]:
        prep = preprocess(img, mod, S)
        unit = prep.pixel_values[0, 0] * PIXEL_STD[0] + PIXEL_MEAN[0]
        lb = prep.letterbox
        content = unit[: lb.new_h, : lb.new_w]
        assert content.min() >= -1e-6 and content.max() <= 1 + 1e-6 and content.std() > 0.05, mod
    filtered = preprocess(sar_f, "sar", S, speckle_filter=True).pixel_values
    plain = preprocess(sar_f, "sar", S).pixel_values
    assert filtered[0, 0].std() < plain[0, 0].std()  # the Lee filter removes speckle


def test_sar_db_scaling_is_known_values():
    # a two-level amplitude image: 1 and 10 (20 dB apart); the robust stretch maps them to 0 and 1
    img = np.ones((64, 64), dtype=np.float32)
    img[:, 32:] = 10.0
    prep = preprocess(img, "sar", 64)
    unit = prep.pixel_values[0, 0] * PIXEL_STD[0] + PIXEL_MEAN[0]
    assert np.allclose(unit[:, :30], 0, atol=1e-5) and np.allclose(unit[:, 34:], 1, atol=1e-5)


def test_nan_pixels_are_filled_and_all_nan_is_refused():
    img = np.random.default_rng(1).random((50, 60)).astype(np.float32)
    img[10:20, 10:20] = np.nan
    assert np.isfinite(preprocess(img, "infrared", 64).pixel_values).all()
    with pytest.raises(InputError, match="no finite pixel"):
        preprocess(np.full((8, 8), np.nan, dtype=np.float32), "sar", 64)


@pytest.mark.parametrize("image, modality, message", [
    (np.zeros((10, 10, 3), np.uint8), "hyperspectral", "unknown modality"),
    (np.zeros((0, 10), np.uint8), "sar", "empty"),
    (np.zeros((10, 10), np.uint8), "optical", "needs 3 bands"),
    (np.zeros((10, 10, 2), np.uint8), "sar", "must be single-band"),
    (np.zeros((10, 10, 5), np.uint8), "infrared", "must be single-band"),
    (np.zeros((4, 4), np.complex64), "optical", "needs 3 bands"),
    (np.zeros((4, 4), np.complex64), "infrared", "complex-valued"),
])
def test_bad_images_get_clear_errors(image, modality, message):
    with pytest.raises(InputError, match=message):
        preprocess(image, modality, 64)


def test_unreadable_and_missing_files(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png at all")
    with pytest.raises(InputError, match="cannot read"):
        read_image(bad)
    with pytest.raises(InputError, match="not found"):
        read_image(tmp_path / "missing.png")
    empty = tmp_path / "empty.tif"
    empty.write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        read_image(empty)


def test_tiff_sixteen_bit_round_trip(tmp_path):
    import tifffile

    img = (np.random.default_rng(2).random((40, 70)) * 60000).astype(np.uint16)
    tifffile.imwrite(tmp_path / "ir.tif", img)
    back = read_image(tmp_path / "ir.tif").data
    assert back.dtype == np.uint16 and np.array_equal(back, img)


def test_prompts_outside_the_image_are_refused():
    lb = Letterbox(100, 200, S)
    for prompts, message in [
        (VisualPrompts([(200, 5)], [], []), "outside"),
        (VisualPrompts([(-1, 5)], [], []), "outside"),
        (VisualPrompts([], [(0, 0, 201, 50)], []), "not inside"),
        (VisualPrompts([], [(50, 50, 40, 60)], []), "not inside"),
        (VisualPrompts([], [], [np.zeros((100, 200), bool)]), "empty"),
        (VisualPrompts([], [], [np.ones((10, 10), bool)]), "image is 200x100"),
    ]:
        with pytest.raises(InputError, match=message):
            prompts.check(lb)


def test_text_boxes_parse_and_format():
    text = "two ships: [0.100,0.200,0.300,0.400] and [0.5, 0.5, 0.9, 1.0]; bad [0.5,0.5,0.4,0.9] [1,2]"
    boxes = parse_text_boxes(text)
    np.testing.assert_allclose(boxes, [[0.1, 0.2, 0.3, 0.4], [0.5, 0.5, 0.9, 1.0]])
    assert format_box(boxes[0]) == "[0.100,0.200,0.300,0.400]"
    assert parse_text_boxes("nothing").shape == (0, 4)


@pytest.mark.parametrize("h, w", list(itertools.product([1, 17, 448, 1000], [1, 300, 5000])))
def test_letterbox_geometry(h, w):
    lb = Letterbox(h, w, S)
    assert max(lb.new_h, lb.new_w) == S and 1 <= min(lb.new_h, lb.new_w) <= S
    mask = np.zeros((S, S), np.float32) + 1.0
    assert lb.mask_from_model(mask).shape == (h, w)


def test_inside_point_lies_on_non_convex_objects():
    from earthgptx.processing import crop_boxes, inside_point

    ring = np.zeros((50, 50), bool)
    ring[10:40, 10:40] = True
    ring[15:35, 15:35] = False  # the centroid (24.5, 24.5) is outside the object
    x, y = inside_point(ring)
    assert ring[int(y), int(x)]
    np.testing.assert_array_equal(crop_boxes(np.array([[10, 5, 20, 15]]), 8, 2), [[2, 3, 12, 13]])


def test_zoom_window_holds_the_prompts_and_stays_in_the_image():
    """``zoom_window``: none for small images or no prompts; else about 2 model sides around
    the prompts (more for a large box), shifted inside the image."""
    size = 256
    SAR = zoom_factor("sar")  # 2 model sides
    click = VisualPrompts([(346, 323)], [], [])
    assert zoom_window(512, 400, click, size, SAR) is None  # no larger than the window: whole image
    assert zoom_window(800, 800, VisualPrompts([], [], []), size, SAR) is None
    assert zoom_window(800, 800, click, size, SAR) == (128, 128, 640, 640)  # the grid's window nearest the click
    assert zoom_window(800, 800, VisualPrompts([(5, 790)], [], []), size, SAR) == (0, 288, 512, 800)  # shifted in
    big = VisualPrompts([(100, 100)], [(50, 60, 750, 500)], [])
    assert zoom_window(3000, 2000, big, size, SAR) == (0, 0, 896, 896)  # 1.25 x the extent, shifted in
    scribble = np.zeros((1000, 3000), bool)
    scribble[400:420, 2900:2990] = True
    x0, y0, x1, y1 = zoom_window(1000, 3000, VisualPrompts([], [], [scribble]), size, SAR)
    assert (x1 - x0, y1 - y0) == (512, 512) and x1 == 3000 and y0 <= 400 and 420 <= y1
    tall = zoom_window(4000, 300, click, size, SAR)  # narrower than the window: every column
    assert tall[0] == 0 and tall[2] == 300 and tall[3] - tall[1] == 512
    # on a grid of half the model side: a click's centre lies 192 px or more inside its window's edges
    # (unless the window meets the image's), and nearby clicks share a window
    rng = np.random.default_rng(0)
    for x, y in rng.uniform(0, 2000, size=(200, 2)):
        x0, y0, x1, y1 = zoom_window(2000, 2000, VisualPrompts([(x, y)], [], []), size, SAR)
        assert (x0 % 128 == 0 or x1 == 2000) and (y0 % 128 == 0 or y1 == 2000) and (x1 - x0, y1 - y0) == (512, 512)
        cx, cy = x + 0.5, y + 0.5  # the clicked pixel's centre
        assert (cx - x0 >= 192 or x0 == 0) and (x1 - cx >= 192 or x1 == 2000)
        assert (cy - y0 >= 192 or y0 == 0) and (y1 - cy >= 192 or y1 == 2000)
    near = VisualPrompts([(340, 330)], [], [])
    assert zoom_window(800, 800, near, size, SAR) == zoom_window(800, 800, click, size, SAR)
    # a box is always inside its window, whatever its size and place (a 400 px box at 250 once was not)
    assert zoom_window(2000, 2000, VisualPrompts([], [(250, 250, 650, 650)], []), size, SAR) == (128, 128, 768, 768)
    for x, y, bw, bh in rng.uniform([0, 0, 1, 1], [1900, 1900, 1500, 1500], size=(500, 4)):
        box = (x, y, min(x + bw, 2000.0), min(y + bh, 2000.0))
        window = zoom_window(2000, 2000, VisualPrompts([], [box], []), size, SAR)
        if window is not None:
            assert window[0] <= box[0] and window[1] <= box[1] and box[2] <= window[2] and box[3] <= window[3], box


def test_zoom_window_side_follows_the_modality():
    """Infrared small targets zoom into 0.75 model sides (on a grid of a quarter of that), SAR
    into 2, optical into 3; an unknown modality is refused with the modalities to use."""
    size = 256
    assert zoom_window(600, 600, VisualPrompts([(300, 300)], [], []), size, zoom_factor("optical")) is None
    click = VisualPrompts([(200, 100)], [], [])
    assert zoom_window(240, 320, click, size, zoom_factor("sar")) is None  # SIRST frame: whole for SAR
    assert zoom_window(240, 320, click, size, zoom_factor("infrared")) == (96, 0, 288, 192)
    small = VisualPrompts([(100, 100)], [], [])
    assert zoom_window(190, 190, small, size, zoom_factor("infrared")) is None  # no larger than the window
    rng = np.random.default_rng(1)
    for x, y in rng.uniform(0, [640, 512], size=(200, 2)):
        x0, y0, x1, y1 = zoom_window(512, 640, VisualPrompts([(x, y)], [], []), size, zoom_factor("infrared"))
        assert (x1 - x0, y1 - y0) == (192, 192) and (x0 % 48 == 0 or x1 == 640) and (y0 % 48 == 0 or y1 == 512)
        # the click's centre lies 3/8 of the window inside it (unless the window meets the image's edge)
        assert (x + 0.5 - x0 >= 72 or x0 == 0) and (x1 - x - 0.5 >= 72 or x1 == 640)
        assert (y + 0.5 - y0 >= 72 or y0 == 0) and (y1 - y - 0.5 >= 72 or y1 == 512)
    with pytest.raises(InputError, match="optical, sar, infrared"):
        zoom_factor("thermal")


def test_window_maps_prompts_masks_and_boxes_to_the_whole_image():
    """A letterbox with a window is the plain letterbox of the cropped image, shifted: points,
    boxes and masks round-trip in the whole image's frame; a mask from the model is pasted at
    the window and empty outside it; preprocess(window=...) equals preprocessing the crop."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(800, 700), dtype=np.uint8)
    window = (100, 250, 612, 762)
    prepared = preprocess(image, "sar", 256, window=window)
    plain = preprocess(image[250:762, 100:612], "sar", 256)
    np.testing.assert_array_equal(prepared.pixel_values, plain.pixel_values)
    lb, crop = prepared.letterbox, plain.letterbox
    assert lb.window == window and (lb.orig_h, lb.orig_w) == (800, 700) and lb.scale == crop.scale == 0.5
    pts = np.array([[100, 250], [611, 761], [346, 323]], dtype=float)
    np.testing.assert_allclose(lb.points_to_model(pts), crop.points_to_model(pts - [100, 250]))
    np.testing.assert_allclose(lb.points_from_model(lb.points_to_model(pts)), pts, atol=1e-9)
    box = np.array([300.0, 300.0, 420.0, 360.0])
    np.testing.assert_allclose(lb.boxes_to_model(box), [100.0, 25.0, 160.0, 55.0])
    np.testing.assert_allclose(lb.boxes_from_normalized(lb.boxes_to_normalized(box)), box, atol=1e-9)
    mask = np.zeros((800, 700), bool)
    mask[300:360, 300:420] = True
    np.testing.assert_array_equal(lb.mask_to_model(mask), crop.mask_to_model(mask[250:762, 100:612]))
    back = lb.mask_from_model(np.where(lb.mask_to_model(mask) > 0, 1.0, -1.0).astype(np.float32))
    assert back.shape == (800, 700)
    np.testing.assert_array_equal(back, mask)  # an even scale: exact
    everywhere = lb.mask_from_model(np.ones((256, 256), np.float32))
    assert everywhere.sum() == 512 * 512 and everywhere[250:762, 100:612].all()
    # the decoder's box of an empty mask (all zero) stays all zero, not the window's corner
    np.testing.assert_allclose(lb.mask_boxes_from_model(np.array([[0.0, 0, 0, 0], [100, 25, 160, 55]])),
                               [[0, 0, 0, 0], [300, 300, 420, 360]])
    with pytest.raises(InputError, match="outside the window"):
        VisualPrompts([(50, 50)], [], []).check(lb)
    with pytest.raises(InputError, match="not inside the 700x800 image"):
        preprocess(image, "sar", 256, window=(0, 0, 701, 100))
