"""Checkpoints round-trip bit-exactly; real weights load from local folders."""
import dataclasses
import json

import numpy as np
import pytest
import torch

from earthgptx.checkpoint import load_checkpoint, save_checkpoint
from earthgptx.config import preset
from earthgptx.errors import CheckpointError
from earthgptx.model import build_model
from earthgptx.predictor import Predictor


def test_save_load_is_bit_exact(tiny, tmp_path, data_root):
    from earthgptx.imageio import read_image

    model, tok = tiny
    save_checkpoint(model, tok, tmp_path / "ckpt")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (tmp_path / "ckpt").iterdir()}
    loaded, tok2 = load_checkpoint(tmp_path / "ckpt")
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert loaded.config == dataclasses.replace(model.config, llm=dataclasses.replace(model.config.llm, tokenizer="."))
    text = "<sar><image> Segment <region1>. [SEG]"
    assert tok(text)["input_ids"] == tok2(text)["input_ids"]
    img = read_image(data_root / "sar/hrsid/P0094_0_800_3000_3800.png").data
    r1 = Predictor.from_model(model, tok).predict(img, "sar", "Segment the ship.")
    r2 = Predictor.from_model(loaded, tok2).predict(img, "sar", "Segment the ship.")
    assert r1.token_ids == r2.token_ids and all(np.array_equal(x, y) for x, y in zip(r1.masks, r2.masks))


def test_vision_towers_and_llm_load_from_local_folders(tmp_path):
    """A user with real weights points the config at local folders; they are used as they are."""
    from transformers import AutoModelForCausalLM

    base, _ = build_model(preset("tiny"))
    base.vision_encoder.vit.save_pretrained(tmp_path / "vit")
    base.vision_encoder.cnn.save_pretrained(tmp_path / "cnn")
    llm_folder = tmp_path / "llm"
    with torch.no_grad():  # a "real" Llama: the tiny LLM with the special-token rows cut off
        lm = base.llm.model
        lm.save_pretrained(llm_folder)
    cfg = json.loads((llm_folder / "config.json").read_text())
    n_base = preset("tiny").llm.vocab_size
    state = AutoModelForCausalLM.from_pretrained(llm_folder).state_dict()
    state["model.embed_tokens.weight"] = state["model.embed_tokens.weight"][:n_base].clone()
    cfg["vocab_size"] = n_base
    from transformers import LlamaConfig, LlamaForCausalLM

    real = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("architectures",)}))
    real.load_state_dict({k: v for k, v in state.items() if k != "lm_head.weight"}, strict=False)
    real.save_pretrained(llm_folder)

    c = preset("tiny")
    c = dataclasses.replace(c, seed=123,
                            vision=dataclasses.replace(c.vision, vit_pretrained=str(tmp_path / "vit"),
                                                       cnn_pretrained=str(tmp_path / "cnn")),
                            llm=dataclasses.replace(c.llm, weights=str(llm_folder)))
    model, _ = build_model(c)
    for name in ("vit", "cnn"):
        for (k, v), (_, w) in zip(getattr(model.vision_encoder, name).state_dict().items(),
                                  getattr(base.vision_encoder, name).state_dict().items()):
            assert torch.equal(v, w), (name, k)
    assert torch.equal(model.llm.embed_table[:n_base], base.llm.embed_table[:n_base])
    assert torch.equal(model.llm.model.model.layers[0].mlp.up_proj.weight, base.llm.model.model.layers[0].mlp.up_proj.weight)
    # the seed differs, so the parts without real weights do differ
    assert not torch.equal(model.pixel_decoder.no_seg_embed.weight, base.pixel_decoder.no_seg_embed.weight)


def test_broken_checkpoints_are_refused(tiny, tmp_path):
    model, tok = tiny
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_checkpoint(tmp_path)
    folder = save_checkpoint(model, tok, tmp_path / "c")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["llm"]["layers"] = 3
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="does not fit"):
        load_checkpoint(folder)
    cfg["llm"]["wings"] = 2
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="unknown keys"):
        load_checkpoint(folder)
    (folder / "model.safetensors").unlink()
    del cfg["llm"]["wings"]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(folder)


def test_trained_checkpoint_without_the_base_llm(tmp_path):
    """``egx train``'s checkpoints leave the frozen base LLM out (it loads from where the config
    names it) and hold the trained parts and the added token rows: loading gives the same model."""
    from safetensors.torch import load_file

    from earthgptx.checkpoint import ADDED_ROWS

    tiny_model, tok = build_model(preset("tiny"))
    tiny_model.llm.model.save_pretrained(tmp_path / "base")  # a local Llama folder as the base LLM
    cfg = dataclasses.replace(preset("tiny"), llm=dataclasses.replace(preset("tiny").llm, weights=str(tmp_path / "base")))
    model, tok = build_model(cfg)
    with torch.no_grad():  # "training": new vision weights and added rows; the base LLM unchanged
        for p in model.vision_encoder.parameters():
            p.add_(0.01)
        model.llm.embed_table[cfg.llm.vocab_size:] += 0.5
    save_checkpoint(model, tok, tmp_path / "trained", base_llm=True)
    stored = load_file(str(tmp_path / "trained" / "model.safetensors"))
    assert not any(k.startswith("llm.") and k != ADDED_ROWS for k in stored)
    assert stored[ADDED_ROWS].shape == (len(tok) - cfg.llm.vocab_size, cfg.llm.hidden)
    loaded, _ = load_checkpoint(tmp_path / "trained")
    a, b = model.state_dict(), loaded.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    with pytest.raises(CheckpointError, match="named weights"):
        save_checkpoint(tiny_model, tok, tmp_path / "nope", base_llm=True)
    # without tokenizer files (the shipped default): the tokenizer is rebuilt from its named source
    save_checkpoint(model, tok, tmp_path / "lean", base_llm=True, tokenizer_files=False)
    assert not (tmp_path / "lean" / "tokenizer.json").exists()
    lean, lean_tok = load_checkpoint(tmp_path / "lean")
    assert lean_tok.get_vocab() == tok.get_vocab()
    for k, v in lean.state_dict().items():
        assert torch.equal(v, a[k]), k


def test_lora_factors_travel_and_fold_into_the_base_llm(tmp_path):
    """A LoRA-trained LLM: the checkpoint holds only the low-rank factors beside the trained
    parts; loading folds them into the base weights, and the plain loaded LLM computes what the
    adapted one computed. Factors for another LLM are refused."""
    from safetensors.torch import load_file, save_file

    from earthgptx.lora import PREFIX, add_lora

    tiny_model, tok = build_model(preset("tiny"))
    tiny_model.llm.model.save_pretrained(tmp_path / "base")
    cfg = dataclasses.replace(preset("tiny"), llm=dataclasses.replace(preset("tiny").llm, weights=str(tmp_path / "base")))
    model, tok = build_model(cfg)
    params = add_lora(model.llm, rank=4, alpha=8.0)
    with torch.no_grad():  # "training" moved the factors (B starts at zero)
        for p in params:
            p.normal_(0.0, 0.05)
    embeds = torch.randn(2, 7, cfg.llm.hidden)
    mask, pos = torch.ones(2, 7, dtype=torch.long), torch.arange(7)[None].expand(2, -1)
    with torch.no_grad():
        adapted = model.llm(embeds, mask, pos)[0]
        base = tiny_model.llm(embeds, mask, pos)[0]
    assert (adapted - base).abs().max() > 1e-3  # the adapters change the answer
    save_checkpoint(model, tok, tmp_path / "lora", base_llm=True)
    stored = load_file(str(tmp_path / "lora" / "model.safetensors"))
    factors = [k for k in stored if k.startswith(PREFIX)]
    assert len(factors) == 2 * 7 * cfg.llm.layers
    assert not any(k.startswith("llm.") and not k.startswith(PREFIX) and k != "llm.added_embeddings" for k in stored)
    loaded, _ = load_checkpoint(tmp_path / "lora")
    with torch.no_grad():
        torch.testing.assert_close(loaded.llm(embeds, mask, pos)[0], adapted, atol=1e-5, rtol=1e-4)
    bad = dict(stored)
    key = factors[0]
    bad[key] = torch.zeros(bad[key].shape[0], bad[key].shape[1] + 1)
    save_file(bad, str(tmp_path / "lora" / "model.safetensors"))
    with pytest.raises(CheckpointError, match="do not fit the LLM"):
        load_checkpoint(tmp_path / "lora")


def test_the_default_model_is_the_shipped_one_else_edge(tmp_path, monkeypatch):
    """With neither --preset nor --checkpoint, predict, eval and the build use the trained model
    in earthgptx/default_model; an installation without it falls back to edge; both is an error."""
    from earthgptx import checkpoint
    from export.build import BuildOptions

    monkeypatch.setattr(checkpoint, "DEFAULT_MODEL_DIR", tmp_path / "default_model")
    assert checkpoint.resolve_source(None, None) == ("edge", None)
    assert BuildOptions().name == "edge"
    (tmp_path / "default_model").mkdir()
    (tmp_path / "default_model" / checkpoint.WEIGHTS_FILE).write_bytes(b"")
    assert checkpoint.resolve_source(None, None) == (None, str(tmp_path / "default_model"))
    opts = BuildOptions()
    assert opts.name == "default" and opts.out_dir.name == "default"
    assert checkpoint.resolve_source("tiny", None) == ("tiny", None)
    assert BuildOptions(checkpoint=str(tmp_path / "mine")).name == "mine"
    with pytest.raises(CheckpointError, match="one of"):
        checkpoint.resolve_source("tiny", tmp_path)
