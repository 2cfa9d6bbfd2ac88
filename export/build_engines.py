"""Build the four engines: ``python export/build_engines.py`` (same as ``egx build``).

With no arguments: the ``edge`` preset, ONNX Runtime FP32 (the embedded default), into
``engines/edge/``. See ``--help`` for backends, precisions and shape limits."""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from export.cli import main as build_main

    return build_main(argv)


if __name__ == "__main__":
    sys.exit(main())
