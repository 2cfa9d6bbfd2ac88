"""The build's console: lines that do not wrap when stderr is a file or a pipe, and progress
for long steps (ONNX export of the LLM, quantization, evaluation) on a terminal and off it.

``BuildConsole.status(text)`` is rich's spinner on a terminal, with the seconds elapsed; off a
terminal (CI logs, ``| tee``) it prints the text once and then a line every ``HEARTBEAT_S``
seconds while the step runs, so a long step is never silent."""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager

from rich.console import Console

HEARTBEAT_S = 20.0  # off a terminal: a "still running" line this often


class BuildConsole(Console):
    """A ``rich`` console on stderr for builds (``soft_wrap``: long lines stay whole)."""

    def __init__(self, **kwargs) -> None:
        kwargs.setdefault("stderr", True)
        kwargs.setdefault("soft_wrap", True)
        super().__init__(**kwargs)

    @contextmanager
    def status(self, status, **kwargs):  # noqa: D102 (rich's signature)
        text = str(status)
        start = time.monotonic()
        if self.is_terminal:
            with super().status(text, **kwargs) as spinner:
                with _every(1.0, lambda: spinner.update(f"{text} ({time.monotonic() - start:.0f} s)")):
                    yield spinner
            return
        self.print(f"{text} ...", highlight=False, markup=False)
        with _every(HEARTBEAT_S, lambda: self.print(f"  ... {text} ({time.monotonic() - start:.0f} s)",
                                                    highlight=False, markup=False)):
            yield None


@contextmanager
def _every(seconds: float, action):
    """Call ``action`` every ``seconds`` from a thread while the ``with`` block runs."""
    done = threading.Event()

    def loop() -> None:
        while not done.wait(seconds):
            action()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
