"""Batched decoding: several sequences stepped together (KV left-padded and masked, each
ending on its own) give the tokens, texts and [SEG] states of decoding them one by one, on
the PyTorch reference and on ONNX Runtime."""
import numpy as np
import pytest

from earthgptx.generation import DecodeBatch, GenerationConfig, generate, generate_batch, generate_steps


def _sequences(predictor, lengths=(9, 23, 16), budgets=(12, 3, 7)):
    rng = np.random.default_rng(0)
    hidden = predictor.config.llm.hidden
    embeds = [rng.normal(0, 1, (1, t, hidden)).astype(np.float32) for t in lengths]
    # a frequent early token as "[SEG]" so that [SEG] states are captured mid-batch
    first = generate(predictor.runners["llm"], embeds[0], predictor.embed_table, predictor.config.llm,
                     GenerationConfig(max_new_tokens=4), set(), -1, predictor.decode_tokens)
    seg_id = first.token_ids[1]
    args = [(e, GenerationConfig(max_new_tokens=n), seg_id) for e, n in zip(embeds, budgets)]
    return args


def _check(predictor):
    llm, table, cfg = predictor.runners["llm"], predictor.embed_table, predictor.config.llm
    args = _sequences(predictor)
    alone = [generate(llm, e, table, cfg, g, set(), seg, predictor.decode_tokens, capture=(2,))
             for e, g, seg in args]
    together = generate_batch(llm, [generate_steps(e, table, cfg, g, set(), seg, predictor.decode_tokens, capture=(2,))
                                    for e, g, seg in args], cfg)
    assert [len(a.token_ids) for a in alone] == [12, 3, 7]  # budgets differ: sequences leave the batch
    for a, b in zip(alone, together):
        assert a.token_ids == b.token_ids and a.text == b.text and a.finish_reason == b.finish_reason
        np.testing.assert_allclose(a.prompt_hidden[0], b.prompt_hidden[0], rtol=0, atol=1e-6)
        assert len(a.seg_hidden) == len(b.seg_hidden)
        for x, y in zip(a.seg_hidden, b.seg_hidden):
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-4)
    assert any(a.seg_hidden for a in alone)


def test_batched_decoding_equals_one_by_one_in_pytorch(tiny_predictor):
    _check(tiny_predictor)


def test_batched_decoding_equals_one_by_one_in_onnxruntime(tiny_build):
    pytest.importorskip("onnxruntime")
    from runners.engines import open_predictor

    _check(open_predictor(tiny_build[0], "cpu"))


def test_a_stop_token_ends_one_sequence_and_not_the_others(tiny_predictor):
    p = tiny_predictor
    llm, table, cfg = p.runners["llm"], p.embed_table, p.config.llm
    (e0, _, _), (e1, _, _), _ = _sequences(p)
    free = [generate(llm, e, table, cfg, GenerationConfig(max_new_tokens=6), set(), -1, p.decode_tokens).token_ids
            for e in (e0, e1)]
    stop = {next(t for t in free[0] if t not in free[1])}  # ends the first sequence only
    alone = [generate(llm, e, table, cfg, GenerationConfig(max_new_tokens=6), stop, -1, p.decode_tokens)
             for e in (e0, e1)]
    together = generate_batch(llm, [generate_steps(e, table, cfg, GenerationConfig(max_new_tokens=6), stop, -1,
                                                   p.decode_tokens) for e in (e0, e1)], cfg)
    assert alone[0].finish_reason == "stop" and alone[1].finish_reason == "length"
    assert [a.token_ids for a in alone] == [b.token_ids for b in together]
    assert [a.finish_reason for a in alone] == [b.finish_reason for b in together]


def test_sequences_joining_a_running_batch_get_their_own_answers(tiny_predictor):
    """Continuous batching (``DecodeBatch``, what a server worker runs): a sequence added while
    others are mid-decode, and one added after some have left, answer as they do alone."""
    p = tiny_predictor
    llm, table, cfg = p.runners["llm"], p.embed_table, p.config.llm
    args = _sequences(p, lengths=(9, 23, 16, 11), budgets=(12, 3, 7, 5))
    alone = [generate(llm, e, table, cfg, g, set(), seg, p.decode_tokens, capture=(2,)) for e, g, seg in args]
    steps = [generate_steps(e, table, cfg, g, set(), seg, p.decode_tokens, capture=(2,)) for e, g, seg in args]
    batch, got = DecodeBatch(llm, cfg), {}
    assert batch.add("a", steps[0]) is None and batch.add("b", steps[1]) is None
    got.update(batch.step())
    assert not got and batch.add("c", steps[2]) is None  # joins "a" and "b" mid-decode
    got.update(batch.step())
    assert list(got) == ["b"]  # 3 tokens: the prefill's and two steps'
    assert batch.add("d", steps[3]) is None  # joins "a" and "c" after "b" left
    with pytest.raises(ValueError, match="already"):
        batch.add("a", steps[0])
    while batch.live:
        got.update(batch.step())
    assert [batch.pop_widest(k) for k in "abcd"] == [3, 3, 3, 3]
    for a, key in zip(alone, "abcd"):
        b = got[key]
        assert a.token_ids == b.token_ids and a.text == b.text and a.finish_reason == b.finish_reason
        np.testing.assert_allclose(a.prompt_hidden[0], b.prompt_hidden[0], rtol=0, atol=1e-6)
        for x, y in zip(a.seg_hidden, b.seg_hidden):
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("task,text", [("segment", "Segment all ships."), ("grounding", "Where are the ships?"),
                                       ("caption", "Describe the image.")])
def test_predict_many_equals_predict_one_by_one(tiny_predictor, data_root, task, text):
    """A scene's tiles in one batch: one vision call, decoding stepped together, the same answers."""
    _check_many(tiny_predictor, data_root, task, text)


def test_predict_many_on_onnxruntime(tiny_build, data_root):
    pytest.importorskip("onnxruntime")
    from runners.engines import open_predictor

    _check_many(open_predictor(tiny_build[0], "cpu"), data_root, "segment", "Segment all ships.")


def _check_many(predictor, data_root, task, text):
    from earthgptx.generation import GenerationConfig
    from earthgptx.imageio import read_image

    chip = read_image(data_root / "sar" / "hrsid" / "P0094_0_800_3000_3800.png").data
    tiles = [chip[:300, :400], chip[200:700, 100:600], chip[500:, 500:]]  # three shapes
    gen = GenerationConfig(max_new_tokens=6)
    alone = [predictor.predict(t, "sar", text, task=task, generation=gen, cache=False) for t in tiles]
    together = predictor.predict_many(tiles, "sar", text, task=task, generation=gen)
    for a, b in zip(alone, together):
        assert a.text == b.text and a.token_ids == b.token_ids and a.finish_reason == b.finish_reason
        np.testing.assert_allclose(a.boxes, b.boxes, atol=1e-3)
        np.testing.assert_allclose(a.scores, b.scores, atol=1e-4)
        assert len(a.masks) == len(b.masks)
        for x, y in zip(a.masks, b.masks):
            assert x.shape == y.shape and np.array_equal(x, y)
    assert predictor.cache.get("") is None  # tiles are not cached
