"""Each part's tensor interface (names, shapes, dtypes) on the tiny preset."""
import numpy as np
import pytest
import torch

from earthgptx import llm as llm_mod
from earthgptx import pixel_decoder, prompt_encoder, vision_encoder
from earthgptx.llm import kv_names
from earthgptx.pixel_decoder import tight_boxes
from earthgptx.prompt_encoder import PROMPT_BOX, PROMPT_FREEFORM, PROMPT_PAD, PROMPT_POINT


@pytest.fixture(scope="module")
def model(tiny):
    return tiny[0]


def test_vision_encoder_shapes(model):
    cfg = model.config.vision
    x = torch.randn(2, 3, cfg.image_size, cfg.image_size)
    with torch.no_grad():
        tokens, emb = model.vision_encoder(x)
    assert tokens.shape == (2, cfg.num_tokens, model.config.llm.hidden) and tokens.dtype == torch.float32
    assert emb.shape == (2, cfg.embed_dim, cfg.grid, cfg.grid) and emb.dtype == torch.float32
    assert vision_encoder.OUTPUT_NAMES == ("image_tokens", "image_embedding")
    with torch.no_grad():  # batch rows are independent
        one, _ = model.vision_encoder(x[1:])
    torch.testing.assert_close(one[0], tokens[1], atol=1e-5, rtol=1e-5)


def test_class_words_are_the_names_words_when_the_classifier_is_sure(tiny):
    """With ``class_names`` the image tokens end in ``class_tokens`` words: the classifier's
    probabilities mixing each name's LLM word embeddings (zero-padded), so a sure classifier
    hands the LLM exactly its class's name."""
    import dataclasses

    model, tokenizer = tiny
    names = ("dense residential", "ZSU-23-4", "T72")
    cfg = dataclasses.replace(model.config.vision, class_names=names, class_tokens=4)
    enc = vision_encoder.VisionEncoder(cfg, model.config.llm.hidden).eval()
    vision_encoder.set_class_words(enc, model.llm.embed_table, tokenizer)
    table = model.llm.embed_table
    for i, name in enumerate(names):
        ids = tokenizer(name, add_special_tokens=False).input_ids[:4]
        torch.testing.assert_close(enc.class_words[i, : len(ids)], table[ids])
        assert not enc.class_words[i, len(ids):].any()
    with torch.no_grad():
        enc.classifier.weight.zero_()
        enc.classifier.bias.copy_(torch.tensor([0.0, 30.0, 0.0]))  # sure of class 1 whatever the image
        x = torch.randn(2, 3, cfg.image_size, cfg.image_size)
        tokens, _, logits = enc.encode(x)
        grid, _ = enc._grid(x)
    assert tokens.shape == (2, cfg.token_grid**2 + 4, model.config.llm.hidden) == (2, cfg.num_tokens, tokens.shape[2])
    assert logits.argmax(1).tolist() == [1, 1]
    torch.testing.assert_close(tokens[:, : cfg.token_grid**2], grid)
    torch.testing.assert_close(tokens[:, cfg.token_grid**2:], enc.class_words[1].expand(2, -1, -1), atol=1e-6, rtol=0)


def test_prompt_encoder_all_types_and_padding(model):
    cfg = model.config
    n, m = cfg.vision.num_tokens, cfg.prompt.mask_size
    image_tokens = torch.randn(1, n, cfg.llm.hidden)
    boxes = torch.tensor([[[0.5, 0.5, -1, -1], [0.1, 0.1, 0.4, 0.3], [0.2, 0.2, 0.6, 0.7], [0, 0, 0, 0]]])
    types = torch.tensor([[PROMPT_POINT, PROMPT_BOX, PROMPT_FREEFORM, PROMPT_PAD]])
    masks = torch.zeros(1, 4, m, m)
    masks[0, 2, 5:20, 5:20] = 1
    with torch.no_grad():
        out = model.prompt_encoder(image_tokens, boxes, types, masks)
        # the free-form raster matters; padding rows neither matter nor carry anything
        masks2 = masks.clone()
        masks2[0, 2] = 0
        masks2[0, 2, 10:12, 10:30] = 1
        out2 = model.prompt_encoder(image_tokens, boxes, types, masks2)
        trimmed = model.prompt_encoder(image_tokens, boxes[:, :3], types[:, :3], masks[:, :3])
    assert out.shape == (1, 4, cfg.llm.hidden)
    assert torch.all(out[0, 3] == 0)
    assert not torch.allclose(out[0, 2], out2[0, 2])
    torch.testing.assert_close(trimmed, out[:, :3], atol=1e-5, rtol=1e-5)
    assert prompt_encoder.INPUT_NAMES == ("image_tokens", "prompt_boxes", "prompt_types", "prompt_masks")


def test_llm_kv_cache_matches_full_forward(model):
    h = model.config.llm.hidden
    n_layers = model.llm.num_layers
    x = torch.randn(1, 7, h)
    with torch.no_grad():
        full = model.llm(x, torch.ones(1, 7, dtype=torch.long), torch.arange(7)[None])
        pre = model.llm(x[:, :5], torch.ones(1, 5, dtype=torch.long), torch.arange(5)[None])
        step = model.llm(x[:, 5:], torch.ones(1, 7, dtype=torch.long), torch.arange(5, 7)[None], *pre[2:])
    logits, hidden, *present = full
    assert logits.shape == (1, model.llm.embed_table.shape[0])
    assert hidden.shape == (1, 7, h)
    assert len(present) == 2 * n_layers and len(kv_names(n_layers, "present")) == 2 * n_layers
    cfg = model.config.llm
    assert present[0].shape == (1, cfg.kv_heads, 7, cfg.head_dim)
    torch.testing.assert_close(step[0], logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(step[1], hidden[:, 5:], atol=1e-4, rtol=1e-4)
    assert llm_mod.OUTPUT_NAMES == ("logits", "last_hidden_state")


def test_llm_left_padding_matches_batch_one(model):
    h = model.config.llm.hidden
    a, b = torch.randn(1, 6, h), torch.randn(1, 4, h)
    batch = torch.cat([a, torch.cat([torch.zeros(1, 2, h), b], 1)])
    mask = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        both = model.llm(batch, mask, pos)
        only_b = model.llm(b, torch.ones(1, 4, dtype=torch.long), torch.arange(4)[None])
    torch.testing.assert_close(both[0][1], only_b[0][0], atol=1e-4, rtol=1e-4)


def test_pixel_decoder_shapes_and_boxes(model):
    cfg = model.config
    c, g, s = cfg.vision.embed_dim, cfg.vision.grid, cfg.vision.image_size
    emb = torch.randn(2, c, g, g)
    seg = torch.randn(2, 3, cfg.llm.hidden)
    valid = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    coords = torch.rand(2, 3, 2, 2) * s
    labels = torch.tensor([1, -1]).repeat(2, 3, 1)
    with torch.no_grad():
        masks, scores, boxes = model.pixel_decoder(emb, seg, valid, coords, labels)
    assert masks.shape == (2, 3, s, s) and scores.shape == (2, 3) and boxes.shape == (2, 3, 4)
    torch.testing.assert_close(boxes, tight_boxes(masks > 0))
    assert pixel_decoder.OUTPUT_NAMES == ("masks", "scores", "boxes")


def test_tight_boxes_known_values():
    fg = torch.zeros(1, 2, 10, 12, dtype=torch.bool)
    fg[0, 0, 2:5, 3:9] = True
    boxes = tight_boxes(fg)
    assert boxes[0, 0].tolist() == [3, 2, 9, 5]
    assert boxes[0, 1].tolist() == [0, 0, 0, 0]


def test_seeded_weights_are_reproducible():
    from earthgptx.config import preset
    from earthgptx.model import build_skeleton

    a, b = build_skeleton(preset("tiny")), build_skeleton(preset("tiny"))
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka


def test_paper_preset_is_13_to_15_billion_on_meta():
    from earthgptx.config import preset
    from earthgptx.model import build_skeleton, parameter_counts

    model = build_skeleton(preset("paper"), device="meta")
    counts = parameter_counts(model)
    assert 13e9 <= counts["total"] <= 15e9
    assert 12.9e9 <= counts["llm"] <= 13.2e9  # LLaMA-2-13B class
    assert all(p.device.type == "meta" for p in model.parameters())
    assert counts["total"] == sum(v for k, v in counts.items() if k != "total")


def test_runners_keep_every_output_whole(tiny_predictor, model):
    cfg = model.config
    feed = {"image_tokens": np.zeros((1, cfg.vision.num_tokens, cfg.llm.hidden), np.float32),
            "prompt_boxes": np.array([[[0.1, 0.1, 0.5, 0.5], [0.2, 0.3, -1, -1]]], np.float32),
            "prompt_types": np.array([[PROMPT_BOX, PROMPT_POINT]]),
            "prompt_masks": np.zeros((1, 2, cfg.prompt.mask_size, cfg.prompt.mask_size), np.float32)}
    out = tiny_predictor.runners["prompt_encoder"](feed)
    assert list(out) == ["region_tokens"] and out["region_tokens"].shape == (1, 2, cfg.llm.hidden)
    with torch.no_grad():
        ref = model.prompt_encoder(*(torch.from_numpy(feed[n]) for n in prompt_encoder.INPUT_NAMES))
    np.testing.assert_array_equal(out["region_tokens"], ref.numpy())
