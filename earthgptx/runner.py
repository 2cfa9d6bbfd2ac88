"""Runners: one interface for every backend. A runner takes a feed dict
``{input_name: np.ndarray}`` and returns ``{output_name: np.ndarray}``; it has an
explicit lifetime (``activate`` / ``deactivate``, or use it as a context manager).
``TorchRunner`` runs a part of the PyTorch reference; the deployment backends
(ONNX Runtime, TensorRT) implement the same interface in ``runtime/``."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn


class Runner:
    name: str = ""

    def activate(self) -> None:
        """Allocate what inference needs (sessions, engines, device memory)."""

    def deactivate(self) -> None:
        """Release it."""

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def __call__(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.infer(feed)

    def __enter__(self) -> "Runner":
        self.activate()
        return self

    def __exit__(self, *exc) -> None:
        self.deactivate()


class TorchRunner(Runner):
    """Runs ``module(*inputs)`` with inputs taken from the feed by name, in
    ``input_names`` order, then any ``extra_prefix``-named inputs (the LLM's past KV)
    in the order given by ``extra_names``; outputs are named ``output_names`` then
    ``extra_output_names``."""

    def __init__(self, name: str, module: nn.Module, input_names: Sequence[str], output_names: Sequence[str],
                 extra_names: Sequence[str] = (), extra_output_names: Sequence[str] = ()) -> None:
        self.name = name
        self.module = module
        self.input_names = tuple(input_names)
        self.output_names = tuple(output_names)
        self.extra_names = tuple(extra_names)
        self.extra_output_names = tuple(extra_output_names)

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [n for n in self.input_names if n not in feed]
        if missing:
            raise KeyError(f"{self.name}: feed lacks inputs {missing}")
        args = [torch.from_numpy(np.ascontiguousarray(feed[n])) for n in self.input_names]
        if self.extra_names and self.extra_names[0] in feed:
            args += [torch.from_numpy(np.ascontiguousarray(feed[n])) for n in self.extra_names]
        with torch.inference_mode():
            outs = self.module(*args)
        if isinstance(outs, torch.Tensor):
            outs = (outs,)
        names = self.output_names + self.extra_output_names
        return {n: o.numpy() for n, o in zip(names, outs)}
