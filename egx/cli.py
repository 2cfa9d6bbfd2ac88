"""``egx``: parse, dispatch to the layer that owns the command, print typed errors.
Subcommands: ``predict``, ``scene``, ``info``, ``build``, ``bench``, ``serve``, ``query``, ``keys``,
``data``, ``train``, ``eval``, ``checkpoint``."""
from __future__ import annotations

import argparse
import sys
from functools import partial

from earthgptx.commands import (add_checkpoint_parser, add_model_parsers, add_model_source, add_prompt_arguments,
                                add_training_parsers, cmd_checkpoint, cmd_data, cmd_eval, cmd_info, cmd_predict,
                                cmd_train, open_reference)
from earthgptx.errors import EarthGPTXError


def _add_model_source(p: argparse.ArgumentParser) -> None:
    """``--preset`` | ``--checkpoint`` (the PyTorch reference) | ``--engines`` (a build), ``--device``."""
    src = add_model_source(p)
    src.add_argument("--engines", metavar="DIR", help="a build folder (manifest.json) from export/build_engines.py")
    p.add_argument("--device", default="auto", help="for --engines: cpu, cuda or auto")


def open_predictor(args: argparse.Namespace):
    """The predictor of ``--engines`` (the runners layer), else of ``--checkpoint``/``--preset``."""
    if args.engines:
        from runners.engines import open_predictor as open_engines

        return open_engines(args.engines, args.device)
    return open_reference(args)


def build_parser() -> argparse.ArgumentParser:
    from benchmarks.run import add_bench_arguments
    from earthgptx.scene.cli import add_scene_arguments
    from export.cli import add_build_arguments
    from runtime.cli import add_keys_arguments, add_query_arguments, add_serve_arguments

    parser = argparse.ArgumentParser(prog="egx", description="EarthGPT-X for optical, SAR and infrared imagery.")
    sub = parser.add_subparsers(dest="command", required=True)
    add_model_parsers(sub, _add_model_source)
    p = sub.add_parser("scene", help="a whole scene (GeoTIFF of any size): zoom-out answer + objects over tiles")
    _add_model_source(p)
    add_scene_arguments(p)
    add_build_arguments(sub.add_parser("build", help="build engines (same as python export/build_engines.py)"))
    add_bench_arguments(sub.add_parser("bench", help="benchmark PyTorch and the built engines side by side"))
    add_serve_arguments(sub.add_parser("serve", help="serve built engines over ZeroMQ (docs/protocol.md)"))
    p = sub.add_parser("query", help="ask a running `egx serve` (same arguments and JSON as predict)")
    add_query_arguments(p)
    add_prompt_arguments(p)
    add_keys_arguments(sub.add_parser("keys", help="write CURVE key pairs for serve/query"))
    add_training_parsers(sub, _add_model_source)
    add_checkpoint_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "build":
        from export.cli import run

        return run(args)
    if args.command == "bench":
        from benchmarks.run import main as bench_main

        return bench_main(args)
    from earthgptx.scene.cli import cmd_scene
    from runtime.cli import cmd_keys, cmd_query, cmd_serve

    handler = {"predict": partial(cmd_predict, open_predictor=open_predictor), "info": cmd_info,
               "scene": partial(cmd_scene, open_predictor=open_predictor),
               "checkpoint": cmd_checkpoint, "serve": cmd_serve, "query": cmd_query, "keys": cmd_keys,
               "data": cmd_data, "train": cmd_train, "eval": partial(cmd_eval, open_predictor=open_predictor)
               }[args.command]
    try:
        return handler(args)
    except EarthGPTXError as exc:
        print(f"egx {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
