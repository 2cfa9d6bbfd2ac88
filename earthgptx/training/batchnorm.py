"""Re-estimate batch-norm running statistics on images prepared as inference prepares them.

During training a batch-norm layer normalises by the statistics of its batch and keeps an
exponential average of them for inference. Two things make that average a poor match for
inference here: the weights move fast (the average lags them), and augmented vision items
are crops resampled to the model size, which smooths SAR speckle and infrared noise, so
their statistics are not those of an image resized once. Measured on MSTAR (EVALUATION.md,
run 6): a classifier trained with crops was right on 51 % of validation images with its
running averages and on 89 % once they were re-estimated. ``recalibrate`` replaces them by the
exact mean of each layer's batch statistics over un-augmented training images, with the
final weights (Ioffe and Szegedy 2015, section 3.1; "precise BN").
"""
from __future__ import annotations

import sys
import time
from typing import Iterable

import numpy as np
import torch
from torch import nn


def batch_norms(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The batch-norm layers of ``module`` that trained: a frozen one (``requires_grad`` off,
    e.g. the pretrained first blocks of ``effnet_lite``) keeps the statistics the layers after
    it were trained with."""
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and (m.weight is None or m.weight.requires_grad)]


@torch.no_grad()
def recalibrate(module: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Set every batch-norm layer of ``module`` to the mean of its batch statistics over
    ``batches`` (each one ``module``'s input, e.g. ``(B, 3, S, S)`` float32 pixel values in
    the model frame). Returns the number of images seen; ``module`` is left in eval mode.
    A module without batch norm is left as it was (returns 0)."""
    norms = batch_norms(module)
    if not norms:
        return 0
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches
    module.train()
    seen = 0
    try:
        for x in batches:
            module(x)
            seen += len(x)
    finally:
        for m, momentum in zip(norms, saved):
            m.momentum = momentum
        module.eval()
    if not seen:
        raise ValueError("recalibrate: no images given")
    return seen


def training_images(samples: list, size: int, batch: int = 32) -> Iterable[torch.Tensor]:
    """``samples`` (``data.readers.Sample``) read and prepared exactly as ``Predictor`` prepares
    an image (``processing.preprocess``), ``batch`` at a time: ``(b, 3, size, size)`` float32."""
    from ..imageio import read_image
    from ..processing import preprocess

    for i in range(0, len(samples), batch):
        chunk = samples[i:i + batch]
        yield torch.from_numpy(np.concatenate(
            [preprocess(read_image(s.image).data, s.modality, size).pixel_values for s in chunk]))


def recalibrate_vision_encoder(model, samples: list, log: bool = True) -> int:
    """``recalibrate`` ``model.vision_encoder`` on ``samples`` (the trainer passes a draw of
    training images balanced as its vision items are). Returns the images seen (0: no batch norm)."""
    encoder = model.vision_encoder
    if not batch_norms(encoder) or not samples:
        return 0
    started = time.perf_counter()
    was_training = encoder.training
    seen = recalibrate(encoder, training_images(samples, model.config.vision.image_size))
    encoder.train(was_training)
    if log:
        print(f"batch-norm statistics of the vision encoder re-estimated on {seen} un-augmented training images "
              f"({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    return seen
