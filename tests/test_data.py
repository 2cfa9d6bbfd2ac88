"""Readers of every layout in ../shared/data, the validation split and the instruction builder."""
import itertools

import numpy as np
import pytest

from earthgptx.data import templates as T
from earthgptx.data.instructions import (TASK_WEIGHTS, VISION_TASK, InstructionMix, applicable_tasks, make_instruction,
                                         teaches_vision)
from earthgptx.data.readers import READERS, dataset_samples
from earthgptx.data.split import Splitter
from earthgptx.processing import Letterbox, parse_text_boxes


def _first(data_root, name, n=3):
    return list(itertools.islice(dataset_samples(data_root, (name,)), n))


def test_aid_reader_gives_class_and_captions(data_root):
    s = _first(data_root, "aid", 1)[0]
    assert s.modality == "optical" and s.dataset == "aid" and s.label and len(s.captions) == 5
    assert s.image.is_file() and s.image.parent.name == s.label  # folder = class


def test_mstar_reader_classes_are_folders(data_root):
    samples = list(dataset_samples(data_root, ("mstar",)))
    assert {s.label for s in samples} == {"2S1", "BMP2", "BRDM_2", "BTR60", "BTR70", "D7", "T62", "T72", "ZIL131",
                                          "ZSU_23_4"}
    assert all(s.modality == "sar" for s in samples) and len(samples) > 2000


def test_colour_mask_readers(data_root):
    import cv2

    ships = _first(data_root, "hrsid-mini", 2)
    for s in ships:
        union = np.logical_or.reduce(s.masks)
        n, _ = cv2.connectedComponents(union.astype(np.uint8))
        assert s.noun == "ship" and s.instances and 1 <= len(s.masks) <= n - 1
        assert all(m.shape == s.masks[0].shape for m in s.masks) and len(s.boxes) == len(s.masks)
    roads = _first(data_root, "road-mini", 2)
    for s in roads:
        assert s.noun == "road" and not s.instances and len(s.masks) == 1
        share = s.masks[0].mean()
        assert 0.01 < share < 0.6  # roads, not the whole tile and not nothing


def test_sirst_v2_reader_keeps_images_without_targets(data_root):
    samples = list(dataset_samples(data_root, ("sirst-v2",)))
    assert len(samples) >= 150 and all(s.modality == "infrared" and s.noun == "target" for s in samples)
    assert any(not s.masks for s in samples) and any(s.masks for s in samples)
    for s in samples:
        for m, b in zip(s.masks, s.boxes):
            ys, xs = np.nonzero(m)
            assert b[0] == xs.min() and b[3] == ys.max() + 1


def test_split_is_by_image_and_deterministic(data_root):
    split = Splitter(data_root)
    samples = list(dataset_samples(data_root, ("sirst", "hrsid", "road-mini", "mstar")))
    a = [split(s) for s in samples]
    assert a == [Splitter(data_root)(s) for s in samples]
    by = {}
    for s, part in zip(samples, a):
        by.setdefault(s.dataset, []).append(part)
    assert set(by["hrsid"]) == {"val"}  # the README's SAR example is never trained on
    test_names = set((data_root / "infrared/sirst/idx_427/test.txt").read_text().split())
    assert all((p == "val") == (s.image.stem in test_names) for s, p in zip(samples, a) if s.dataset == "sirst")
    share = by["mstar"].count("val") / len(by["mstar"])
    assert 0.1 < share < 0.2
    train_images = {s.image for s, p in zip(samples, a) if p == "train"}
    assert not train_images & {s.image for s, p in zip(samples, a) if p == "val"}


def test_readable_class_names():
    assert T.readable_class("DenseResidential") == "dense residential"
    assert T.readable_class("ZSU_23_4") == "ZSU-23-4" and T.readable_class("2S1") == "2S1"
    assert T.class_key("ZSU-23-4") == T.class_key("zsu_23_4") == "zsu234"
    assert T.clean_caption("many planes are parked near a terminal .") == "Many planes are parked near a terminal."


@pytest.fixture(scope="module")
def ir_ship_samples(data_root):
    return [s for s in dataset_samples(data_root, ("sirst", "hrsid-mini")) if len(s.masks) >= 2][:6]


def test_every_task_from_annotations(data_root, ir_ship_samples):
    rng = np.random.default_rng(0)
    aid, mstar = _first(data_root, "aid", 1)[0], _first(data_root, "mstar", 1)[0]
    inst = make_instruction(aid, "classify", rng)
    assert inst.answer == T.readable_class(aid.label) and inst.text in T.CLASSIFY_SCENE
    assert make_instruction(aid, "caption", rng).answer in [T.clean_caption(c) for c in aid.captions]
    assert make_instruction(mstar, "classify", rng).text in T.CLASSIFY_VEHICLE
    assert make_instruction(aid, "segment", rng) is None  # no masks: not applicable
    s = ir_ship_samples[0]
    assert set(applicable_tasks(s)) >= {"count", "presence", "region", "segment", "grounding", "click"}
    assert make_instruction(s, "count", rng).answer == str(len(s.masks))
    for _ in range(20):
        click = make_instruction(s, "click", rng)
        (k,) = click.target
        lb = Letterbox(*s.masks[0].shape, 256)
        click.prompts.check(lb)
        for x, y in click.prompts.points:
            assert s.masks[k][int(y), int(x)]  # the click lies on its object
        seg = make_instruction(s, "segment", rng)
        assert seg.seg and seg.target is not None and all(0 <= i < len(s.masks) for i in seg.target)
        ground = make_instruction(s, "grounding", rng)
        boxes = parse_text_boxes(ground.answer)
        h, w = s.masks[0].shape
        truth = Letterbox(h, w, max(h, w)).boxes_to_normalized(s.boxes[list(ground.target)])
        assert len(boxes) == min(len(ground.target), 4)
        assert all(np.abs(truth - b).max(axis=1).min() < 1e-3 for b in boxes)  # each written box is a target's


def test_referring_phrase_picks_the_right_object(ir_ship_samples):
    rng = np.random.default_rng(1)
    seen = 0
    for s in ir_ship_samples:
        for _ in range(10):
            inst = make_instruction(s, "segment", rng)
            if "top-left" in inst.text:
                (k,) = inst.target
                c = (s.boxes[:, :2] + s.boxes[:, 2:]).sum(1)
                assert k == int(np.argmin(c))
                seen += 1
            if "largest" in inst.text:
                (k,) = inst.target
                assert k == int(np.argmax([m.sum() for m in s.masks]))
                seen += 1
    assert seen > 0


def test_mix_is_seeded_and_covers_tasks(data_root, ir_ship_samples):
    samples = ir_ship_samples + _first(data_root, "aid", 5) + _first(data_root, "mstar", 5)
    mix = InstructionMix(samples, seed=3)
    a = [(i.task, i.text, i.answer) for i in mix.epoch(2, 200)]
    assert a == [(i.task, i.text, i.answer) for i in InstructionMix(samples, seed=3).epoch(2, 200)]
    assert set(t for t, _, _ in a) == set(TASK_WEIGHTS)
    with pytest.raises(ValueError, match="unknown tasks"):
        InstructionMix(samples, {"nonsense": 1.0})


def test_vision_items_are_images_with_a_class_or_objects(data_root, ir_ship_samples):
    """``images``: seeded, only images the vision heads can learn from, every such dataset."""
    roads = _first(data_root, "road-mini", 2)
    samples = ir_ship_samples + roads + _first(data_root, "aid", 5) + _first(data_root, "mstar", 5)
    samples += [s for s in _first(data_root, "dota", 3)]  # boxes of many classes: nothing for the heads
    mix = InstructionMix(samples, seed=3)
    items = mix.images(4, 80)
    assert [i.sample.image for i in items] == [i.sample.image for i in InstructionMix(samples, seed=3).images(4, 80)]
    assert all(i.task == VISION_TASK and not i.text and i.target is None and teaches_vision(i.sample) for i in items)
    assert {i.sample.dataset for i in items} == {s.dataset for s in samples if teaches_vision(s)}
    assert "dota" not in {i.sample.dataset for i in items} and teaches_vision(roads[0])
    assert mix.images(4, 0) == []


def test_every_layout_has_a_reader(data_root):
    for name, (folder, _) in READERS.items():
        assert (data_root / folder).is_dir(), name
        assert next(iter(dataset_samples(data_root, (name,))), None) is not None, name
