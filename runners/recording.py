"""A runner that records what it is fed and what it answers: the feeds every part sees in
a real chain (parity checks, INT8 calibration, benchmarks). ``{input_name: ndarray}`` in
and out, copied, up to ``limit`` calls."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from earthgptx.runner import Runner


@dataclass
class Recording:
    feeds: list[dict[str, np.ndarray]]
    outputs: list[dict[str, np.ndarray]]


class RecordingRunner(Runner):
    def __init__(self, inner: Runner, limit: int) -> None:
        self.inner, self.name, self.limit = inner, inner.name, limit
        self.recording = Recording([], [])

    def infer(self, feed):
        out = self.inner.infer(feed)
        if len(self.recording.feeds) < self.limit:
            self.recording.feeds.append({k: np.array(v) for k, v in feed.items()})
            self.recording.outputs.append({k: np.array(v) for k, v in out.items()})
        return out
