"""Every task and prompt type through ``Predictor.predict`` on the tiny preset, checked
against the parts run by hand and against ``transformers``' own generation."""
import numpy as np
import pytest
import torch

from earthgptx.errors import InputError
from earthgptx.generation import GenerationConfig
from earthgptx.imageio import read_image
from earthgptx.processing import Letterbox, VisualPrompts, polygon_mask, zoom_factor, zoom_window
from earthgptx.prompting import build_prompt, splice

SAR = "sar/hrsid/P0094_0_800_3000_3800.png"
IR = "infrared/sirst/images/Misc_10.png"
OPT = "optical/dota/images/P1888.png"
GEN = GenerationConfig(max_new_tokens=6)


@pytest.fixture(scope="module")
def sar(data_root):
    return read_image(data_root / SAR).data


def test_segment_with_point_gives_full_size_mask(tiny_predictor, sar):
    r = tiny_predictor.predict(sar, "sar", "Segment the ship.", VisualPrompts([(400, 400)], [], []), generation=GEN)
    assert r.task == "segment" and len(r.masks) >= 1
    assert all(m.shape == (800, 800) and m.dtype == bool for m in r.masks)
    assert len(r.scores) == len(r.masks) and r.box_sources[: len(r.masks)] == ["pixel_decoder"] * len(r.masks)
    for m, box in zip(r.masks, r.boxes):  # the decoder's box is the mask's box (within a model pixel)
        if m.any():
            rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
            np.testing.assert_allclose(box, [cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], atol=800 / 128 + 1)
    for k in ("preprocess", "vision_encoder", "prompt_encoder", "llm", "pixel_decoder", "postprocess"):
        assert k in r.timings_ms


def test_forced_seg_mask_equals_parts_run_by_hand(tiny, tiny_predictor, sar):
    """The first mask is the pixel decoder on the LLM's last hidden state of the prompt
    ending in [SEG], computed here without the predictor's generation loop."""
    model, tok = tiny
    p = tiny_predictor
    r = p.predict(sar, "sar", "Segment the ship.", generation=GenerationConfig(max_new_tokens=0))
    enc, _ = p.encode_image(sar, "sar")
    ids = tok(build_prompt("Segment the ship.", "sar", 0, True), add_special_tokens=False)["input_ids"]
    emb = splice(np.array(ids), p.embed_table, enc.image_tokens[0], None, p.image_id, p.region_ids)
    with torch.no_grad():
        hidden = model.llm.model.model(inputs_embeds=torch.from_numpy(emb)[None]).last_hidden_state[0, -1]
        masks, scores, _ = model.pixel_decoder(torch.from_numpy(enc.image_embedding), hidden[None, None],
                                               torch.ones(1, 1), torch.zeros(1, 1, 1, 2),
                                               torch.full((1, 1, 1), -1))
    assert len(r.masks) == 1 and r.token_ids == []
    expected = enc.letterbox.mask_from_model(masks[0, 0].numpy())
    assert np.array_equal(r.masks[0], expected)
    assert r.scores[0] == pytest.approx(float(scores[0, 0]), abs=1e-5)


def test_grounding_gives_a_box_per_object_of_the_mask(tiny_predictor, data_root):
    from earthgptx.processing import component_boxes

    img = read_image(data_root / OPT).data
    r = tiny_predictor.predict(img, "optical", "Where is the large vehicle?", generation=GEN)
    assert r.task == "grounding" and r.masks == []
    assert r.boxes.shape[1] == 4 and np.all(r.boxes[:, 2] <= img.shape[1]) and np.all(r.boxes[:, 3] <= img.shape[0])
    # the same forced [SEG] prompt segments: grounding's boxes are that mask's connected components
    seg = tiny_predictor.predict(img, "optical", "Where is the large vehicle?", task="segment", generation=GEN)
    decoder = r.boxes[[i for i, s in enumerate(r.box_sources) if s == "pixel_decoder"]]
    expected = np.concatenate([component_boxes(m) for m in seg.masks]).reshape(-1, 4)  # every [SEG]'s mask
    np.testing.assert_allclose(decoder, expected, atol=1e-6)
    assert len(r.scores) == len(decoder)


@pytest.mark.parametrize("kind", ["point", "box", "freeform"])
def test_region_prompts_reach_the_llm(tiny_predictor, data_root, kind):
    img = read_image(data_root / IR).data
    h, w = img.shape[:2]
    lb = Letterbox(h, w, 448)
    prompts = {
        "point": VisualPrompts([(100, 120)], [], []),
        "box": VisualPrompts([], [(50, 60, 150, 140)], []),
        "freeform": VisualPrompts([], [], [polygon_mask(np.array([[10, 10], [120, 30], [60, 150]]), lb)]),
    }[kind]
    from runners.recording import RecordingRunner

    p = tiny_predictor
    original = p.runners
    p.runners = {n: RecordingRunner(r, 1) for n, r in original.items()}
    try:
        r = p.predict(img, "infrared", "What is in <region1>?", prompts, generation=GEN)
        region = p.runners["prompt_encoder"].recording.outputs[0]["region_tokens"][0, 0]
        embeds = p.runners["llm"].recording.feeds[0]["inputs_embeds"][0]
    finally:
        p.runners = original
    assert r.task == "region" and r.masks == [] and "prompt_encoder" in r.timings_ms
    # the prompt encoder's region token is one of the LLM's input rows
    assert np.any(np.all(np.isclose(embeds, region, atol=0), axis=1))


def test_region_tokens_are_spliced_where_named(tiny_predictor):
    p = tiny_predictor
    table = p.embed_table
    ids = np.array([5, p.region_ids[1], p.image_id, p.region_ids[0], 7])
    image = np.full((3, table.shape[1]), 9.0, np.float32)
    regions = np.stack([np.full(table.shape[1], 1.0), np.full(table.shape[1], 2.0)]).astype(np.float32)
    out = splice(ids, table, image, regions, p.image_id, p.region_ids)
    assert out.shape == (7, table.shape[1])
    assert np.all(out[1] == 2.0) and np.all(out[2:5] == 9.0) and np.all(out[5] == 1.0)
    np.testing.assert_array_equal(out[0], table[5])
    with pytest.raises(InputError, match="region2"):
        splice(ids, table, image, regions[:1], p.image_id, p.region_ids)


def test_click_skips_the_llm(tiny_predictor, sar):
    r = tiny_predictor.predict(sar, "sar", "", VisualPrompts([(100, 200)], [(300, 300, 500, 450)], []), task="click",
                               zoom=False)
    assert r.task == "click" and len(r.masks) == 1 and r.masks[0].shape == (800, 800)
    assert "llm" not in r.timings_ms and r.text == ""
    assert r.timings_ms["vision_encoder"] == 0.0  # the image was encoded by an earlier test: cache hit


def test_zoomed_answers_are_the_windows_answers_in_the_whole_frame(tiny_predictor, sar):
    """A click or a prompted segment on an image over twice the model side is answered on the
    window around it (``zoom_window``): the same tokens, scores and masks as the request on the
    cropped window with the prompts shifted into it, masks pasted back and boxes shifted; a
    nearby click reuses the window's encoding."""
    size = tiny_predictor.config.vision.image_size
    click = VisualPrompts([(346, 323)], [], [])
    x0, y0, x1, y1 = zoom_window(800, 800, click, size, zoom_factor("sar"))
    assert (x1 - x0, y1 - y0) == (2 * size, 2 * size)
    crop = np.ascontiguousarray(sar[y0:y1, x0:x1])
    inside = VisualPrompts([(346 - x0, 323 - y0)], [], [])
    for text, task in (("", "click"), ("Segment the ship.", "segment")):
        got = tiny_predictor.predict(sar, "sar", text, click, task=task, generation=GEN)
        want = tiny_predictor.predict(crop, "sar", text, inside, task=task, generation=GEN)
        assert got.token_ids == want.token_ids and len(got.masks) == len(want.masks) >= 1, task
        np.testing.assert_allclose(got.scores, want.scores, atol=1e-6)
        for g, w in zip(got.masks, want.masks):
            assert g.shape == (800, 800) and not g[:y0].any() and not g[y1:].any() and not g[:, x1:].any()
            np.testing.assert_array_equal(g[y0:y1, x0:x1], w)
        np.testing.assert_allclose(got.boxes, want.boxes + [x0, y0, x0, y0], atol=1e-6)
        whole = tiny_predictor.predict(sar, "sar", text, click, task=task, generation=GEN, zoom=False)
        assert not np.array_equal(got.scores, whole.scores)  # the window is not the squashed image
    again = tiny_predictor.predict(sar, "sar", "", VisualPrompts([(340, 330)], [], []), task="click")
    assert again.timings_ms["vision_encoder"] == 0.0  # the same window: its encoding is cached


def test_an_infrared_click_zooms_into_the_smaller_infrared_window(tiny_predictor):
    """Infrared clicks are answered on 0.75 model sides around them (``zoom_factor``), a window
    a SAR click on the same pixels would not use; ``predict`` refuses an unknown modality
    before any work."""
    size = tiny_predictor.config.vision.image_size
    rng = np.random.default_rng(3)
    frame = rng.integers(0, 255, size=(2 * size, 2 * size), dtype=np.uint8)
    click = VisualPrompts([(3 * size // 2, size)], [], [])
    x0, y0, x1, y1 = tiny_predictor.zoom_window(frame.shape, click, "infrared")
    assert (x1 - x0, y1 - y0) == (3 * size // 4, 3 * size // 4)
    assert tiny_predictor.zoom_window(frame.shape, click, "sar") is None  # no larger than 2 sides
    got = tiny_predictor.predict(frame, "infrared", "", click, task="click", cache=False)
    crop = np.ascontiguousarray(frame[y0:y1, x0:x1])
    want = tiny_predictor.predict(crop, "infrared", "", VisualPrompts([(3 * size // 2 - x0, size - y0)], [], []),
                                  task="click", cache=False)
    np.testing.assert_array_equal(got.masks[0][y0:y1, x0:x1], want.masks[0])
    assert not got.masks[0][:, :x0].any() and not got.masks[0][:, x1:].any()
    with pytest.raises(InputError, match="unknown modality"):
        tiny_predictor.predict(frame, "thermal", "", click, task="click")


@pytest.mark.parametrize("text, task", [("Describe this image.", "caption"),
                                        ("Classify the scene.", "classify"),
                                        ("How many ships are there?", "vqa")])
def test_scene_tasks_give_text_only(tiny_predictor, sar, text, task):
    r = tiny_predictor.predict(sar, "sar", text, generation=GEN)
    assert r.task == task and r.masks == [] and isinstance(r.text, str)
    assert len(r.token_ids) <= GEN.max_new_tokens


def test_greedy_matches_transformers_generate(tiny, tiny_predictor, sar):
    model, tok = tiny
    p = tiny_predictor
    gen = GenerationConfig(max_new_tokens=12)
    r = p.predict(sar, "sar", "Describe this image.", generation=gen)
    enc, _ = p.encode_image(sar, "sar")
    ids = tok(build_prompt("Describe this image.", "sar", 0, False), add_special_tokens=False)["input_ids"]
    emb = torch.from_numpy(splice(np.array(ids), p.embed_table, enc.image_tokens[0], None, p.image_id, p.region_ids))
    with torch.no_grad():
        ref = model.llm.model.generate(inputs_embeds=emb[None], attention_mask=torch.ones(1, emb.shape[0], dtype=torch.long),
                                       max_new_tokens=12, do_sample=False, eos_token_id=sorted(p.stop_ids),
                                       pad_token_id=0)
    ref_ids = [t for t in ref[0].tolist() if t not in p.stop_ids]
    assert r.token_ids == ref_ids


def test_sampling_streaming_and_stops(tiny_predictor, sar):
    p = tiny_predictor
    sampled = [p.predict(sar, "sar", "Describe.", generation=GenerationConfig(
        max_new_tokens=10, do_sample=True, temperature=1.5, top_k=50, top_p=0.95, seed=s)).token_ids for s in (1, 1, 2)]
    assert sampled[0] == sampled[1] and sampled[0] != sampled[2]
    pieces = []
    r = p.predict(sar, "sar", "Describe.", generation=GenerationConfig(max_new_tokens=10, do_sample=True, seed=3),
                  on_text=pieces.append)
    assert "".join(pieces) == r.text and len(r.token_ids) <= 10
    if len(r.text) > 2:
        stop = r.text[1:3]
        cut = p.predict(sar, "sar", "Describe.", generation=GenerationConfig(
            max_new_tokens=10, do_sample=True, seed=3, stop_strings=(stop,)))
        assert cut.finish_reason == "stop_string" and stop not in cut.text and r.text.startswith(cut.text)


def test_bad_requests(tiny_predictor, sar):
    p = tiny_predictor
    with pytest.raises(InputError, match="outside"):
        p.predict(sar, "sar", "Segment it.", VisualPrompts([(900, 10)], [], []))
    with pytest.raises(InputError, match="at most"):
        p.predict(sar, "sar", "What?", VisualPrompts([(1, 1)] * 9, [], []))
    with pytest.raises(InputError, match="must not contain"):
        p.predict(sar, "sar", "<image> what?")
    with pytest.raises(InputError, match="needs at least one"):
        p.predict(sar, "sar", "", task="click")
    with pytest.raises(InputError, match="unknown task"):
        p.predict(sar, "sar", "x", task="dance")
    with pytest.raises(InputError, match="unknown modality"):
        p.predict(sar, "radar", "x")
    with pytest.raises(InputError, match="region3"):
        p.predict(sar, "sar", "Compare <region1> and <region3>.", VisualPrompts([(1, 1), (5, 5)], [], []))


def test_image_cache_is_lru_and_bounded_in_bytes():
    from earthgptx.image_cache import ImageCache, image_id

    cache = ImageCache(max_bytes=100)
    cache.put("a", "A", 40)
    cache.put("b", "B", 40)
    assert cache.get("a") == "A"  # a is now the most recent
    cache.put("c", "C", 40)  # 120 > 100: the least recent (b) goes
    assert "b" not in cache and cache.get("a") == "A" and cache.get("c") == "C"
    cache.put("huge", "H", 101)  # larger than the whole budget: not kept, nothing evicted
    assert "huge" not in cache and cache.stats().bytes == 80 and cache.stats().evictions == 1
    img = np.zeros((4, 5), np.uint8)
    assert image_id(img) == image_id(img.copy()) != image_id(img.astype(np.uint16))
    assert image_id(img) != image_id(img.reshape(5, 4))
    with pytest.raises(InputError):
        image_id(np.array([[object()]]))


def test_predictor_cache_skips_the_vision_encoder_and_evicts(tiny, sar):
    from earthgptx.predictor import Predictor

    model, tokenizer = tiny
    first, _ = Predictor.from_model(model, tokenizer).encode_image(sar, "sar")
    p = Predictor.from_model(model, tokenizer)
    p.cache.max_bytes = first.nbytes  # room for one encoding
    click = VisualPrompts([(400, 400)], [], [])
    assert p.predict(sar, "sar", "", click, task="click").timings_ms["vision_encoder"] > 0
    again = p.predict(sar, "sar", "", click, task="click")
    assert again.timings_ms["vision_encoder"] == 0
    other = sar[:600].copy()
    p.predict(other, "sar", "", click, task="click")  # evicts the first image
    assert p.cache.stats().entries == 1 and p.cache.stats().evictions == 1
    assert p.predict(sar, "sar", "", click, task="click").timings_ms["vision_encoder"] > 0
    assert p.predict(sar, "optical", "", click, task="click").timings_ms["vision_encoder"] > 0  # per modality


def _predictors(tiny, tiny_build):
    from earthgptx.predictor import Predictor
    from runners.engines import open_predictor

    yield "pytorch", lambda: Predictor.from_model(*tiny)
    yield "onnxruntime", lambda: open_predictor(tiny_build[0], "cpu")


def test_prefill_on_a_cached_prefix_equals_the_whole_prefill(tiny, tiny_build):
    """The ``llm`` part (PyTorch and its ONNX engine): the positions after a prefix, fed on
    top of the prefix's KV, get the hidden states and logits the whole prompt gets."""
    from earthgptx.generation import PrefixKV, prefill_feed
    from earthgptx.llm import kv_names

    cfg = tiny[0].config.llm
    embeds = np.random.default_rng(0).normal(0, 0.05, (23, cfg.hidden)).astype(np.float32)
    for name, make in _predictors(tiny, tiny_build):
        llm = make().runners["llm"]
        whole = llm(prefill_feed(embeds, cfg))
        names = zip(kv_names(cfg.layers, "past_key_values"), kv_names(cfg.layers, "present"))
        prefix = PrefixKV(9, {p: whole[n][:, :, :9] for p, n in names})
        rest = llm(prefill_feed(embeds, cfg, prefix))
        np.testing.assert_allclose(rest["last_hidden_state"][0], whole["last_hidden_state"][0, 9:], atol=2e-5, err_msg=name)
        np.testing.assert_allclose(rest["logits"], whole["logits"], atol=2e-4, err_msg=name)
        np.testing.assert_allclose(rest["present.0.key"], whole["present.0.key"], atol=2e-5, err_msg=name)
        with pytest.raises(ValueError, match="nothing to prefill"):
            prefill_feed(embeds[:9], cfg, prefix)


def test_prompts_on_a_cached_image_give_the_uncached_answers(tiny, tiny_build, sar):
    """Four prompts on one image: the first fills the prefix cache, the others prefill only
    their own tokens; every answer (tokens, masks, scores) equals a fresh predictor's. (Without
    zoom: a zoomed request's window is an image, and a prefix, of its own.)"""
    reqs = [("Describe the image.", VisualPrompts([], [], []), "caption"),
            ("Segment the ship.", VisualPrompts([(346, 323)], [], []), "segment"),
            ("Where is the ship?", VisualPrompts([], [], []), "grounding"),
            ("What is in <region1>?", VisualPrompts([], [(300, 300, 400, 400)], []), "region")]
    for name, make in _predictors(tiny, tiny_build):
        cached = make()
        answers = [cached.predict(sar, "sar", text, p, task=task, generation=GEN, zoom=False) for text, p, task in reqs]
        stats = cached.prefix_cache.stats()
        assert (stats.entries, stats.misses, stats.hits) == (1, 1, 3), name
        for (text, p, task), got in zip(reqs, answers):
            fresh = make().predict(sar, "sar", text, p, task=task, generation=GEN, zoom=False)
            assert got.token_ids == fresh.token_ids and got.text == fresh.text, (name, task)
            assert got.to_json()["masks"] == fresh.to_json()["masks"], (name, task)
            np.testing.assert_allclose(got.scores, fresh.scores, atol=1e-5, err_msg=f"{name} {task}")
            np.testing.assert_allclose(got.boxes, fresh.boxes, atol=1e-3, err_msg=f"{name} {task}")
        cached.predict(sar, "optical", "Describe the image.", generation=GEN)  # another modality: its own prefix
        assert cached.prefix_cache.stats().entries == 2
        cached.clear_cache()
        assert cached.prefix_cache.stats().entries == 0
