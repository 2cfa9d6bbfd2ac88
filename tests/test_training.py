"""Training on the tiny preset: the loss goes down, data-parallel equals one process,
resuming equals not stopping, and the batches are laid out as inference lays them out."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO

DATASETS = ("hrsid-mini", "mstar")


def _train_cmd(out, data_root, steps, nproc=1, lora=4):
    # fp32: bf16 autocast (the default where the CPU has it) rounds differently per batch split
    args = ["train", "--preset", "tiny", "--data", str(data_root), "--out", str(out), "--steps", str(steps),
            "--batch-size", "6", "--log-every", "1", "--threads", "1", "--lr", "3e-3", "--warmup", "2",
            "--precision", "fp32", "--lora-rank", str(lora), "--lora-lr", "3e-3", "--vision-batch", "4"]
    for d in DATASETS:
        args += ["--dataset", d]
    if nproc == 1:
        return [sys.executable, "-m", "egx", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
            str(29500 + os.getpid() % 500), "-m", "egx", *args]


def _run(cmd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model" / "model.safetensors"))


def _train(module, batch, counts, steps=20) -> tuple[dict, dict]:
    """``steps`` AdamW steps on one batch: the losses before the first and after the last."""
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=3e-3)
    first = None
    for _ in range(steps):
        losses = module(batch, counts)
        first = first or {k: float(v.detach()) for k, v in losses.items()}
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
    return first, {k: float(v.detach()) for k, v in module(batch, counts).items()}


@pytest.fixture(scope="module")
def encoded(tiny, data_root):
    from earthgptx.data.instructions import InstructionMix
    from earthgptx.data.readers import dataset_samples
    from earthgptx.training.batches import Encoder

    model, tokenizer = tiny
    samples = list(dataset_samples(data_root, DATASETS))
    enc = Encoder(model.config, tokenizer, classes={("mstar", s.label): i for i, s in enumerate(
        {s.label: s for s in samples if s.label}.values())})
    return enc, InstructionMix(samples, seed=0).epoch(0, 12)


def test_text_layout_matches_inference(tiny, encoded):
    """The trained ids are the prompt ``Predictor`` builds (after the system prefix) + answer."""
    from earthgptx.prompting import build_prompt

    _, tokenizer = tiny
    enc, insts = encoded
    for inst in insts:
        if inst.task == "click":
            continue
        ids, labels, seg_pos = enc.text_ids(inst)
        prompt = tokenizer(build_prompt(inst.text, inst.sample.modality, len(inst.prompts), inst.seg),
                           add_special_tokens=False)["input_ids"]
        n = len(prompt) - len(enc.prefix_ids)
        assert list(ids[:n]) == prompt[len(enc.prefix_ids):]
        assert (labels[:n] == -100).all() and (labels[n:] == ids[n:]).all()
        assert tokenizer.decode(ids[n:]).strip().startswith(inst.answer.strip()[:8])
        if inst.seg:
            assert ids[seg_pos] == enc.seg_id


def test_augment_geometry_moves_masks_with_the_image():
    """Rotation, mirror and crop act on the image and its masks alike (a mask drawn into the
    image stays where the image has it), and do change the image."""
    from earthgptx.training.batches import augment_geometry

    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)
    mask = np.zeros((40, 56), dtype=bool)
    mask[5:12, 30:50] = True
    image[..., 0] = mask * 255
    shapes = set()
    for seed in range(20):
        out, (m,) = augment_geometry(image, [mask], np.random.default_rng(seed))
        assert out.shape[:2] == m.shape and out.flags.c_contiguous
        np.testing.assert_array_equal(out[..., 0], m * 255)
        shapes.add(out.shape[:2])
    assert len(shapes) > 5


def test_flipped_scene_items_flip_their_object_map(tiny, data_root):
    """A geometry-free item (count, presence...) may be mirrored: its object map is mirrored with it."""
    from earthgptx.data.instructions import make_instruction
    from earthgptx.data.readers import dataset_samples
    from earthgptx.imageio import read_image
    from earthgptx.processing import preprocess
    from earthgptx.training.batches import Encoder

    model, tokenizer = tiny
    sample = next(s for s in dataset_samples(data_root, ("sirst",)) if s.masks)
    inst = make_instruction(sample, "presence", np.random.default_rng(0))
    enc = Encoder(model.config, tokenizer)
    draws = {}
    for seed in range(10):
        rng = np.random.default_rng(seed)
        flip = np.random.default_rng(seed).random() < 0.5
        draws.setdefault(flip, enc(inst, rng=rng))
    plain, flipped = draws[False], draws[True]
    lb = preprocess(read_image(sample.image).data, sample.modality, model.config.vision.image_size).letterbox
    h, w = lb.new_h, lb.new_w
    np.testing.assert_array_equal(flipped.pixel_values[:, :h, :w], plain.pixel_values[:, :h, :w][:, :, ::-1])
    np.testing.assert_array_equal(flipped.objects[:h, :w], plain.objects[:h, :w][:, ::-1])
    assert plain.objects.sum() > 0


def test_vision_items_click_on_an_object_of_their_augmented_image(tiny, data_root):
    """A vision item with objects carries a click query made after its augmentation: the point
    lies on the target it asks for, or the box holds it; the target is one object's coverage."""
    from earthgptx.data.instructions import VISION_TASK, Instruction
    from earthgptx.data.readers import dataset_samples
    from earthgptx.pixel_decoder import LABEL_BOX_BOTTOM_RIGHT, LABEL_BOX_TOP_LEFT, LABEL_FOREGROUND
    from earthgptx.training.batches import Encoder

    model, tokenizer = tiny
    sample = next(s for s in dataset_samples(data_root, ("hrsid-mini",)) if len(s.masks) > 1)
    enc = Encoder(model.config, tokenizer)
    kinds = set()
    for seed in range(12):
        e = enc(Instruction(sample, VISION_TASK, "", ""), rng=np.random.default_rng(seed))
        (coords, labels), t = e.points, e.target
        assert t.shape == (model.config.vision.image_size,) * 2 and t.max() <= 1.0
        if labels.tolist() == [LABEL_FOREGROUND]:
            kinds.add("point")
            x, y = np.floor(coords[0]).astype(int)
            if t.any():
                assert t[max(0, y - 1):y + 2, max(0, x - 1):x + 2].max() > 0
        else:
            kinds.add("box")
            assert labels.tolist() == [LABEL_BOX_TOP_LEFT, LABEL_BOX_BOTTOM_RIGHT]
            ys, xs = np.nonzero(t > 0.5)
            if len(xs):  # the jittered box holds most of the object
                (x0, y0), (x1, y1) = coords
                inside = (xs >= x0 - 2) & (xs <= x1 + 2) & (ys >= y0 - 2) & (ys <= y1 + 2)
                assert inside.mean() > 0.8
        assert t.sum() < e.objects.sum() + 1e-3  # one object, not all of them
    assert kinds == {"point", "box"}


def test_a_few_steps_lower_the_loss(tiny, encoded):
    from earthgptx.model import build_model
    from earthgptx.config import preset
    from earthgptx.training.batches import collate
    from earthgptx.training.step import TrainModule

    torch.manual_seed(0)  # the training-only heads' initial weights
    model, tokenizer = build_model(preset("tiny"))
    enc, insts = encoded
    batch = collate([enc(i, rng=np.random.default_rng(k)) for k, i in enumerate(insts)], 0)
    counts = {"tokens": int((batch["labels"] != -100).sum()), "masks": len(batch["mask_rows"]), "clicks": 1,
              "images": len(insts)}
    module = TrainModule(model, torch.from_numpy(enc.prefix_ids), enc.image_id, enc.region_ids, num_classes=10)
    llm_before = {k: v.clone() for k, v in model.llm.state_dict().items()}
    first, last = _train(module, batch, counts)
    assert last["loss"] < first["loss"] - 1.5
    assert last["text"] < first["text"] and last["mask_dice"] < first["mask_dice"]
    assert last["mask_bce"] < 0.5 * first["mask_bce"] and last["aux_class"] < first["aux_class"]
    # the class head learns at least the batch's class prior in these 20 steps (the tiny encoder
    # barely tells MSTAR chips apart so soon): its loss reaches the prior's entropy
    labels = batch["labels_cls"][batch["labels_cls"] >= 0]
    share = torch.bincount(labels).float()
    share = share[share > 0] / len(labels)
    prior = float(-(share * share.log()).sum()) * len(labels) / len(insts)
    assert last["aux_class"] < prior + 0.05
    for k, v in model.llm.state_dict().items():  # the base LLM is frozen
        assert torch.equal(v, llm_before[k]), k
    assert not torch.equal(module.added, model.llm.embed_table[module.n_base:])  # added rows trained
    module.write_back()
    assert torch.equal(module.added, model.llm.embed_table[module.n_base:])


def test_class_words_classifier_learns_from_labels_and_from_the_text_loss(tiny, encoded):
    """With class words the class loss trains the vision encoder's own classifier (no
    training-only head), and the answer's cross-entropy reaches it through the words."""
    import dataclasses

    from earthgptx.config import preset
    from earthgptx.model import build_model
    from earthgptx.training.batches import collate
    from earthgptx.training.step import TrainModule

    enc, insts = encoded
    names = tuple(f"class {k}" for k in range(10))
    base = preset("tiny")
    torch.manual_seed(0)
    model, tokenizer = build_model(dataclasses.replace(base, vision=dataclasses.replace(base.vision, class_names=names)))
    assert model.vision_encoder.class_words.any()  # build_model fills them from the LLM's table
    module = TrainModule(model, torch.from_numpy(enc.prefix_ids), enc.image_id, enc.region_ids, num_classes=10)
    assert module.aux_class is None
    batch = collate([enc(i, rng=np.random.default_rng(k)) for k, i in enumerate(insts)], 0)
    counts = {"tokens": int((batch["labels"] != -100).sum()), "masks": len(batch["mask_rows"]), "clicks": 1,
              "images": len(insts)}
    module(batch, counts)["text"].backward()
    assert float(model.vision_encoder.classifier.weight.grad.abs().sum()) > 0
    with pytest.raises(ValueError, match="classes"):
        TrainModule(model, torch.from_numpy(enc.prefix_ids), enc.image_id, enc.region_ids, num_classes=7)
    model.zero_grad()
    first, last = _train(module, batch, counts, steps=10)
    assert last["aux_class"] < first["aux_class"]


def test_vision_items_clicks_train_the_pixel_decoder(tiny, encoded):
    """Vision items alone (no text): their click loss falls in a few steps and only the vision
    side moves (the LLM's added rows get no gradient)."""
    from earthgptx.config import preset
    from earthgptx.data.instructions import InstructionMix
    from earthgptx.model import build_model
    from earthgptx.training.batches import collate
    from earthgptx.training.step import TrainModule

    enc, insts = encoded
    items = InstructionMix([i.sample for i in insts if i.sample.masks], seed=0).images(0, 6)
    batch = collate([enc(i, rng=np.random.default_rng(k)) for k, i in enumerate(items)], 0)
    clicks = int(batch["mask_vision"].sum())
    assert clicks == len(items) and len(batch["text_rows"]) == 0
    counts = {"tokens": 1, "masks": 1, "clicks": clicks, "images": len(items)}
    torch.manual_seed(0)
    model, _ = build_model(preset("tiny"))
    module = TrainModule(model, torch.from_numpy(enc.prefix_ids), enc.image_id, enc.region_ids, num_classes=10)
    added = module.added.detach().clone()
    first, last = _train(module, batch, counts)
    # (the tiny decoder's Dice on one-object clicks falls slowly: a quarter off in 20 steps shows the
    # clicks' gradient reaches it; a click path without gradient stays where it starts)
    assert last["click"] < 0.75 * first["click"] and last["aux_dense"] < first["aux_dense"]
    assert first["text"] == first["mask_bce"] == 0.0  # no instruction in the batch
    assert torch.equal(module.added, added)


def test_ddp_two_processes_equal_one(tmp_path, data_root):
    _run(_train_cmd(tmp_path / "one", data_root, 3))
    _run(_train_cmd(tmp_path / "two", data_root, 3, nproc=2))
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert a.keys() == b.keys()
    moved = 0
    init = _weights_initial()
    for k in a:
        if k.endswith("k_proj.bias"):
            # a key bias shifts every logit of a softmax row equally: its true gradient is 0, what it
            # gets is rounding noise (which Adam scales to a full step): not comparable across runs
            continue
        # Adam turns a gradient of ~0 (rounding noise, which differs with the batch split) into a
        # full step of either sign: an isolated element may differ by up to 2 x steps x lr; every
        # other element agrees to rounding
        stray = int((~torch.isclose(a[k], b[k], atol=2e-5, rtol=1e-4)).sum())
        assert stray <= max(1, a[k].numel() // 500), (k, stray)
        assert float((a[k] - b[k]).abs().max()) <= 2 * 3 * 3e-3, k
        moved += not torch.equal(a[k], init[k]) if k in init else 0
    assert moved > 10  # training changed the weights, identically in both runs
    # LoRA (folded into the saved LLM) trained every adapted layer, the same in both runs
    assert not torch.equal(a["llm.model.model.layers.0.mlp.down_proj.weight"],
                           init["llm.model.model.layers.0.mlp.down_proj.weight"])


def test_fsdp_two_processes_equal_one_and_resume(tmp_path, data_root):
    """FSDP2 (every LLM layer a unit of its own, the rest the root unit) over 2 gloo processes
    trains what one unsharded process trains at the same global batch, even on steps where a
    rank has no text rows or no prompts; a sharded run resumed from state.pt equals one that
    did not stop."""
    _run(_train_cmd(tmp_path / "one", data_root, 3))
    _run(_train_cmd(tmp_path / "fsdp", data_root, 3, nproc=2) + ["--fsdp"])
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "fsdp")
    assert a.keys() == b.keys()
    for k in a:
        if not k.endswith("k_proj.bias"):  # see the DDP test
            torch.testing.assert_close(a[k], b[k], atol=2e-5, rtol=1e-4, msg=k)
    _run(_train_cmd(tmp_path / "cut", data_root, 2, nproc=2) + ["--fsdp"])
    r = _run(_train_cmd(tmp_path / "cut", data_root, 3, nproc=2) + ["--fsdp"])
    assert "resuming" in r.stderr
    c = _weights(tmp_path / "cut")
    for k in b:
        torch.testing.assert_close(c[k], b[k], atol=1e-6, rtol=1e-5, msg=k)
    alone = subprocess.run(_train_cmd(tmp_path / "alone", data_root, 1) + ["--fsdp"], cwd=REPO, capture_output=True,
                           text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert alone.returncode == 2 and "torchrun" in alone.stderr  # sharding needs ranks: said, not a hang


def test_fsdp_trains_on_a_named_llama_folder(tmp_path, data_root):
    """``--llm DIR`` (how a paper-scale base LLM is named): a Hugging Face Llama folder becomes
    the LLM part; two FSDP ranks train on it and the checkpoint keeps its frozen base."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from earthgptx.checkpoint import load_checkpoint
    from earthgptx.weights import _base_tokenizer

    folder = tmp_path / "llama"
    tokenizer = _base_tokenizer("smollm2-gguf")
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        tie_word_embeddings=True))
    base.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    _run(_train_cmd(tmp_path / "run", data_root, 2, nproc=2) + ["--fsdp", "--llm", str(folder)])
    model, _ = load_checkpoint(tmp_path / "run" / "model")
    assert model.config.llm.layers == 2 and model.config.llm.hidden == 64
    table = model.llm.embed_table.detach()
    torch.testing.assert_close(table[:len(tokenizer)], base.model.embed_tokens.weight.detach())  # frozen base rows
    with pytest.raises(Exception, match="config.json"):
        from earthgptx.weights import llm_config_from_folder

        llm_config_from_folder(tmp_path)


def _weights_initial():
    from earthgptx.config import preset
    from earthgptx.model import build_skeleton

    return build_skeleton(preset("tiny")).state_dict()


def test_resume_equals_an_uninterrupted_run(tmp_path, data_root):
    _run(_train_cmd(tmp_path / "full", data_root, 4))
    _run(_train_cmd(tmp_path / "cut", data_root, 2))
    r = _run(_train_cmd(tmp_path / "cut", data_root, 4))
    assert "resuming" in r.stderr and "at step 2" in r.stderr
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "cut")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5, msg=k)
    rows = (tmp_path / "cut" / "log.csv").read_text().splitlines()
    assert [int(r.split(",")[0]) for r in rows[1:]] == [1, 2, 3, 4]
    assert (tmp_path / "full" / "loss.png").stat().st_size > 1000


def test_dry_run_prints_instructions(data_root):
    r = _run([sys.executable, "-m", "egx", "train", "--preset", "tiny", "--data", str(data_root),
              "--out", "/nonexistent/never-written", "--dataset", "mstar", "--batch-size", "4", "--dry-run"])
    assert "validation images held out" in r.stdout and "[classify] mstar:" in r.stdout
    assert not os.path.exists("/nonexistent/never-written")


def test_ship_writes_the_default_model_with_its_card(tmp_path, data_root):
    """A run of the small preset (one step, LoRA) becomes a lean default-model folder: the run's
    tensors byte for byte, no tokenizer files, a card with the file's sha256 and the metrics."""
    import hashlib
    import json

    from earthgptx.checkpoint import load_checkpoint
    from earthgptx.training.ship import ship

    from earthgptx.training.batchnorm import batch_norms
    from earthgptx.training.loop import BN_IMAGES

    run = tmp_path / "run"
    r = _run([sys.executable, "-m", "egx", "train", "--preset", "small", "--data", str(data_root),
              "--out", str(run), "--steps", "1", "--batch-size", "2", "--dataset", "mstar", "--lora-rank", "2",
              "--threads", "1"])
    assert f"re-estimated on {BN_IMAGES} un-augmented training images" in r.stderr
    # the vision encoder trained in training mode: its batch norms updated their running
    # statistics in the step (run 6 trained with them frozen at 0 and 1, in eval mode)
    state = torch.load(run / "state.pt", map_location="cpu", weights_only=False)["module"]
    var = [v for k, v in state.items() if k.startswith("model.vision_encoder.") and k.endswith("running_var")]
    assert var and not any(torch.equal(v, torch.ones_like(v)) for v in var)
    report = {"model": str(run / "model"), "rows": [{"task": "classify", "dataset": "mstar", "modality": "sar",
                                                      "n": 4, "accuracy": 0.75}],
              "baseline": [{"task": "classify", "dataset": "mstar", "accuracy": 0.25}]}
    (tmp_path / "eval.json").write_text(json.dumps(report))
    card = ship(run, tmp_path / "eval.json", tmp_path / "default", command="egx train ...", commit="abc1234")
    out = tmp_path / "default"
    assert sorted(p.name for p in out.iterdir()) == ["MODEL_CARD.md", "config.json", "model.safetensors"]
    data = (out / "model.safetensors").read_bytes()
    assert data == (run / "model" / "model.safetensors").read_bytes()
    text = card.read_text()
    assert hashlib.sha256(data).hexdigest() in text and "| classify | mstar | sar | 4 | accuracy | 0.750 | 0.250 |" in text
    assert "abc1234" in text and "LoRA rank 2" in text
    shipped, tok = load_checkpoint(out)
    trained, run_tok = load_checkpoint(run / "model")
    assert tok.get_vocab() == run_tok.get_vocab()
    for k, v in trained.state_dict().items():
        assert torch.equal(v, shipped.state_dict()[k]), k
    # the saved batch-norm statistics are the re-estimated ones (a cumulative mean over its batches)
    norms = batch_norms(shipped.vision_encoder)
    assert norms and all(int(m.num_batches_tracked) == BN_IMAGES // 32 for m in norms)


def test_batch_norm_statistics_are_re_estimated_on_the_images_given():
    """``recalibrate``: each layer's running mean becomes the mean of its inputs over every
    image, so that in eval mode the network gives what batch statistics of the set give."""
    from torch import nn

    from earthgptx.training.batchnorm import recalibrate

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))
    for m in (net[1], net[4]):  # stale statistics, far from the data's
        m.running_mean.fill_(5.0)
        m.running_var.fill_(100.0)
    x = torch.randn(16, 3, 12, 12) * 3 + 1
    assert recalibrate(net, [x[:8], x[8:]]) == 16 and not net.training
    with torch.no_grad():
        torch.testing.assert_close(net[1].running_mean, net[0](x).mean((0, 2, 3)), rtol=1e-5, atol=1e-5)
    assert net[1].momentum == 0.1  # restored
    recalibrate(net, [x])
    with torch.no_grad():
        eval_out = net(x)
        net.train()
        batch_out = net(x)
    # the running variance is unbiased, batch norm divides by the biased one: under 0.1 % here
    assert (eval_out - batch_out).abs().max() <= 1e-3 * batch_out.abs().max()
    assert recalibrate(nn.Sequential(nn.Conv2d(3, 4, 3)), [x]) == 0  # nothing to do without batch norm


def test_train_config_refuses_bad_values_and_sets_the_vision_norm(tmp_path):
    """Wrong values are errors before any work; ``--vision-norm`` sets the CNN's normalisation
    (the small preset's default is batch norm; group norm is how run 5 was trained)."""
    from earthgptx.errors import InputError
    from earthgptx.training.loop import TrainConfig

    for bad in ({"steps": 0}, {"vision_batch": -1}, {"lora_rank": -2}, {"precision": "fp8"},
                {"vision_norm": "layer"}):
        with pytest.raises(InputError):
            TrainConfig(data=str(tmp_path), out=str(tmp_path / "o"), **bad)
    small = TrainConfig(data=str(tmp_path), out=str(tmp_path / "o"))
    assert small.model_config().vision.norm == "batch"
    assert TrainConfig(data=str(tmp_path), out=str(tmp_path / "o"), vision_norm="group").model_config().vision.norm == "group"
    with pytest.raises(InputError, match="CNN vision encoder"):
        TrainConfig(data=str(tmp_path), out=str(tmp_path / "o"), preset="tiny", vision_norm="batch").model_config()


def test_auto_precision_is_bf16_on_cuda_and_on_cpus_with_amx_only(monkeypatch):
    """``--precision auto``: bf16 autocast on CUDA and where the CPU has AMX tiles; fp32 on a
    CPU with AVX512-BF16 alone, where bf16 autocast was measured 1.45x slower per step."""
    from earthgptx.training.loop import use_bf16

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert use_bf16("auto", cuda) and use_bf16("bf16", cpu) and not use_bf16("fp32", cuda)
    for amx in (True, False):  # this machine's AVX512-BF16, or none, plays no part
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
        assert use_bf16("auto", cpu) is amx


def test_vision_warmup_prepares_images_as_inference_and_trains_the_encoder_alone(data_root):
    """``--vision-warmup``: the images held in memory are what inference feeds the encoder, the
    ranks split each step's images between them, object steps (model size, clicks) and class
    steps (half size, then the model size) share the minutes, and the warm-up lowers the class
    loss while touching nothing but the vision side (encoder, pixel decoder) and its
    training-only heads."""
    import contextlib
    import dataclasses

    from earthgptx.config import preset
    from earthgptx.data.instructions import InstructionMix
    from earthgptx.data.readers import dataset_samples
    from earthgptx.imageio import read_image
    from earthgptx.model import build_model
    from earthgptx.processing import preprocess
    from earthgptx.training.loop import class_index
    from earthgptx.training.step import TrainModule
    from earthgptx.training.warmup import VisionImages, warm_up_vision

    samples = list(dataset_samples(data_root, DATASETS))
    mix = InstructionMix(samples, seed=0)
    classes = class_index(samples)
    images = VisionImages(mix, classes, 128, log=False)
    n = sum(len(p) for p in mix.vision_pools.values())
    assert images.pixels.shape == (n, 3, 128, 128) and images.pixels.dtype == torch.float16
    first = mix.samples[mix.vision_pools["hrsid-mini"][0]]
    row = images.pools["hrsid-mini"][0]
    want = preprocess(read_image(first.image).data, first.modality, 128).pixel_values[0]
    np.testing.assert_allclose(images.pixels[row].float().numpy(), want, atol=2e-2)
    assert images.object_of[row] >= 0 and images.labels[row] == -1
    assert all(images.labels[r] >= 0 for r in images.pools["mstar"])

    whole, counts = images.batch(3, 8, seed=0)
    halves = [images.batch(3, 8, seed=0, rank=r, world=2)[0] for r in (0, 1)]
    assert counts["images"] == 8 and [h["size"] for h in halves] == [4, 4]
    assert torch.equal(whole["pixel_values"][0::2], halves[0]["pixel_values"])
    assert torch.equal(whole["labels_cls"][1::2], halves[1]["labels_cls"])

    # the warm-up learns: on 12 MSTAR chips and the ships it fits the class loss down (a
    # tiny encoder on all 2,335 chips moves too little in seconds to tell from noise)
    few = [x for x in samples if x.dataset == "hrsid-mini"] + [x for x in samples if x.dataset == "mstar"][:12]
    images = VisionImages(InstructionMix(few, seed=0), classes, 256, log=False)
    torch.manual_seed(0)
    tiny = preset("tiny")  # with the CNN encoder (whose class steps start at half size) at 256 px
    model, tokenizer = build_model(dataclasses.replace(tiny, vision=dataclasses.replace(
        tiny.vision, kind="cnn", patch_size=8, image_size=256)))
    module = TrainModule(model, torch.zeros(3, dtype=torch.long), 0, [], num_classes=len(classes)).train()
    held, held_counts = images.batch(10_000, 64, seed=0)
    with torch.no_grad():
        before = float(module(held, held_counts)["aux_class"])
    frozen = {k: v.clone() for k, v in module.state_dict().items()
              if not k.startswith(("model.vision_encoder.", "model.pixel_decoder.", "aux_"))}
    assert images.groups == {"objects": ["hrsid-mini"], "classes": ["mstar"]}
    only, _ = images.batch(0, 8, seed=0, group="objects")
    assert bool((only["labels_cls"] == -1).all()) and only["objects"].shape[0] == 8  # ships only
    calls = []
    batch_of = images.batch

    def recorded(*args, **kw):  # which group each step drew, at which size, with clicks or not
        calls.append((kw["group"], kw["size"], kw["clicks"]))
        return batch_of(*args, **kw)

    images.batch = recorded
    # a clock on which each step takes 0.15 s: 60 steps in the 0.15 minutes, on any machine
    steps = warm_up_vision(module, module, images, 0.15, 32, 2e-3, 0, 0, 1, torch.device("cpu"),
                           contextlib.nullcontext(), lambda v: v, main=False, clock=lambda: 0.15 * len(calls))
    with torch.no_grad():
        after = float(module(held, held_counts)["aux_class"])
    assert steps == 60 and after < 0.5 * before, (steps, before, after)
    # object steps at the model size with clicks from the start; class steps first at half size
    assert len(calls) == steps and {c for c in calls if c[0] == "objects"} == {("objects", 256, True)}
    class_sizes = [size for group, size, clicks in calls if group == "classes" and not clicks]
    assert class_sizes[0] == 128 and set(class_sizes) == {128, 256} and class_sizes == sorted(class_sizes)
    assert calls.index(("objects", 256, True)) < calls.index(("classes", 256, False))
    for k, v in module.state_dict().items():
        if k in frozen:
            assert torch.equal(v, frozen[k]), k


def test_vision_warmup_batches_resample_crop_and_click_several_objects(data_root):
    """The warm-up's progressive-resizing batches: images and object maps resampled together to
    the phase's size, crops of 70-100 % of each side; each image with objects carries clicks on
    up to three distinct connected objects, each one's coverage its target, the image's clicks
    sharing its weight; the global click count (images with objects) is the same on every rank."""
    import cv2

    from earthgptx.data.instructions import InstructionMix
    from earthgptx.data.readers import dataset_samples
    from earthgptx.pixel_decoder import LABEL_BOX_BOTTOM_RIGHT, LABEL_BOX_TOP_LEFT, LABEL_FOREGROUND
    from earthgptx.training.loop import class_index
    from earthgptx.training.warmup import CLICKS_PER_IMAGE, VisionImages

    samples = [x for x in dataset_samples(data_root, DATASETS) if x.dataset == "hrsid-mini"]
    mix = InstructionMix(samples, seed=0)
    images = VisionImages(mix, class_index(samples), 128, log=False)
    small, _ = images.batch(0, 6, seed=0, size=64)
    assert small["pixel_values"].shape == (6, 3, 64, 64) and small["objects"].shape[-2:] == (64, 64)
    # resampling keeps an object map's area (in model pixels, up to the 4x smaller frame)
    whole, _ = images.batch(0, 6, seed=0)
    np.testing.assert_allclose(small["objects"].sum((1, 2)).numpy(), whole["objects"].sum((1, 2)).numpy() / 4,
                               rtol=0.02)

    batch, counts = images.batch(5, 8, seed=1, crops=True, clicks=True)
    halves = [images.batch(5, 8, seed=1, rank=r, world=2, crops=True, clicks=True)[1] for r in (0, 1)]
    assert counts["clicks"] == 8 and all(h["clicks"] == 8 for h in halves)  # every HRSID chip has objects
    rows = batch["mask_rows"].tolist()
    assert sorted(set(rows)) == batch["object_rows"].tolist() and bool(batch["mask_vision"].all())
    for r, target in zip(rows, batch["targets"]):
        objects = batch["objects"][batch["object_rows"].tolist().index(r)]
        assert bool((target <= objects + 1e-6).all())  # a part of the image's objects ...
        count, _ = cv2.connectedComponents((target.numpy() > 0).astype(np.uint8), connectivity=8)
        assert count - 1 == int(bool((target > 0).any()))  # ... one connected object, or none
    for r, objects in zip(batch["object_rows"].tolist(), batch["objects"]):
        # up to CLICKS_PER_IMAGE distinct objects an image, sharing its weight in the loss
        mine = [q for q, row in enumerate(rows) if row == r]
        count, _ = cv2.connectedComponents((objects.numpy() > 0).astype(np.uint8), connectivity=8)
        assert len(mine) == max(1, min(CLICKS_PER_IMAGE, count - 1))
        assert float(batch["click_weight"][mine].sum()) == pytest.approx(1.0)
        hit = torch.stack([batch["targets"][q] > 0 for q in mine]).sum(0)
        assert int(hit.max()) <= 1  # no object clicked twice
    assert len(rows) > 8  # HRSID chips hold several ships: more queries than images
    kinds = []
    for idx, coords, labels in batch["point_groups"]:
        for q, xy, lab in zip(idx.tolist(), coords[:, 0], labels[:, 0]):
            target = batch["targets"][q]
            kinds.append(lab.tolist())
            if lab.tolist() == [LABEL_FOREGROUND]:  # a foreground point lies on its object
                x, y = (int(v) for v in xy[0])
                assert target[y, x] > 0
            else:  # a box's corners enclose most of the object
                (x0, y0), (x1, y1) = xy.tolist()
                assert float(target[int(y0):int(y1) + 1, int(x0):int(x1) + 1].sum()) > 0.5 * float(target.sum())
    both = {(LABEL_FOREGROUND,), (LABEL_BOX_TOP_LEFT, LABEL_BOX_BOTTOM_RIGHT)}
    assert len(kinds) == len(rows) and set(map(tuple, kinds)) == both


def test_vision_and_pixel_lr_give_their_parts_their_own_learning_rates(tmp_path):
    """``--vision-lr`` / ``--pixel-lr``: the vision encoder's / pixel decoder's parameters (and
    only they) take it; every trained parameter is in exactly one group; without them the groups
    are those older runs resume from."""
    from earthgptx.config import preset
    from earthgptx.errors import InputError
    from earthgptx.model import build_model
    from earthgptx.training.loop import TrainConfig, param_groups
    from earthgptx.training.step import TrainModule

    model, _ = build_model(preset("tiny"))
    module = TrainModule(model, torch.zeros(3, dtype=torch.long), 0, [], num_classes=4, lora_rank=2)
    vision = {id(p) for p in model.vision_encoder.parameters()}
    pixel = {id(p) for p in model.pixel_decoder.parameters()}
    trained = [p for p in module.parameters() if p.requires_grad]
    for pixel_lr in (None, 1.5e-3):
        cfg = TrainConfig(data=str(tmp_path), out=str(tmp_path / "o"), preset="tiny", lr=2e-3, vision_lr=5e-4,
                          pixel_lr=pixel_lr, lora_lr=1e-3)
        groups = param_groups(module, cfg)
        members = [id(p) for g in groups for p in g["params"]]
        assert sorted(members) == sorted(id(p) for p in trained)
        for g in groups:
            ids = {id(p) for p in g["params"]}
            assert (g["scale"] == 0.25) == bool(ids & vision) and (not ids & vision or ids <= vision)
            if pixel_lr is not None:
                assert (g["scale"] == 0.75) == bool(ids & pixel)
                assert not ids & pixel or ids <= pixel
            elif ids & pixel:
                assert g["scale"] == 1.0
    plain = TrainConfig(data=str(tmp_path), out=str(tmp_path / "o"), preset="tiny", lr=2e-3, lora_lr=1e-3)
    assert [g["scale"] for g in param_groups(module, plain)] == [1.0, 1.0, 0.5]
    for flag, field in (("--vision-lr", "vision_lr"), ("--pixel-lr", "pixel_lr")):
        with pytest.raises(InputError, match=flag):
            TrainConfig(data=str(tmp_path), out=str(tmp_path / "o"), **{field: 0.0})


def test_the_model_card_command_names_the_recipe_options():
    """A shipped card's ``egx train`` command carries the warm-up and vision options a run used."""
    from earthgptx.training.ship import _args

    cfg = {"preset": "lite", "out": "runs/r", "steps": 6000, "batch_size": 16, "lr": 0.002, "lora_rank": 8, "time_limit_min": 65.0,
           "vision_batch": 48, "vision_norm": None, "vision_warmup": 30.0, "vision_lr": 0.0005, "pixel_lr": 0.001}
    assert _args(cfg) == ("--preset lite --out runs/r --steps 6000 --batch-size 16 --lr 0.002 --lora-rank 8 --time-limit 65 "
                          "--vision-batch 48 --vision-warmup 30 --vision-lr 0.0005 --pixel-lr 0.001")
    assert "--vision-warmup" not in _args({**cfg, "vision_warmup": 0.0, "vision_lr": None})
