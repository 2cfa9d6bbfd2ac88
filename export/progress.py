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
        done = threading.Event()
        if self.is_terminal:
            with super().status(text, **kwargs) as spinner:
                def tick() -> None:
                    while not done.wait(1.0):
                        spinner.update(f"{text} ({time.monotonic() - start:.0f} s)")

                thread = threading.Thread(target=tick, daemon=True)
                thread.start()
                try:
                    yield spinner
                finally:
                    done.set()
                    thread.join()
            return

        def beat() -> None:
            while not done.wait(HEARTBEAT_S):
                self.print(f"  ... {text} ({time.monotonic() - start:.0f} s)", highlight=False, markup=False)

        self.print(f"{text} ...", highlight=False, markup=False)
        thread = threading.Thread(target=beat, daemon=True)
        thread.start()
        try:
            yield None
        finally:
            done.set()
            thread.join()
