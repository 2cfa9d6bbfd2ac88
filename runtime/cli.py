"""``egx serve``, ``egx query`` and ``egx keys``: thin over ``server``, ``client`` and ``security``."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from earthgptx.image_cache import DEFAULT_CACHE_BYTES, DEFAULT_PREFIX_CACHE_BYTES
from earthgptx.scene.cli import add_tiling_arguments

from .protocol import DEFAULT_MAX_QUEUE, DEFAULT_MAX_REQUEST_BYTES


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engines", required=True, type=Path, metavar="DIR", help="a build folder (manifest.json)")
    p.add_argument("--bind", default="tcp://127.0.0.1:5555", help="client address (default: %(default)s)")
    p.add_argument("--workers", type=int, default=1, help="worker processes (per stage with --staged)")
    p.add_argument("--batch", type=int, default=1, metavar="N",
                   help="requests each worker takes at once, their decode steps run together in one LLM call "
                        "(continuous batching: each streams and ends on its own; default: %(default)s)")
    p.add_argument("--staged", action="store_true",
                   help="vision encoder and language stages in separate processes, overlapping requests")
    p.add_argument("--devices", default="cpu",
                   help="comma list, assigned to workers in turn: cpu, cuda, cuda:K (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads per worker (default: all cores)")
    p.add_argument("--cache-mb", type=float, default=DEFAULT_CACHE_BYTES / 2**20,
                   help="image-embedding cache per worker (MiB)")
    p.add_argument("--prefix-cache-mb", type=float, default=DEFAULT_PREFIX_CACHE_BYTES / 2**20,
                   help="per worker: the LLM KV of each image's prompt prefix, so a later prompt on a cached "
                        "image prefills only its own tokens (MiB)")
    p.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE, help="queued requests before 'busy' replies")
    p.add_argument("--max-request-mb", type=float, default=DEFAULT_MAX_REQUEST_BYTES / 2**20,
                   help="largest request accepted (MiB)")
    p.add_argument("--curve-secret", type=Path, metavar="FILE", help="the server's .key_secret (egx keys)")
    p.add_argument("--allow", type=Path, metavar="DIR", help="folder of the allowed clients' .key files")
    p.add_argument("--insecure", action="store_true", help="allow a non-loopback bind without CURVE")
    p.add_argument("--grace", type=float, default=10.0, help="seconds in-flight requests get at shutdown")


def add_query_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--connect", required=True, metavar="ADDR", help="the server, e.g. tcp://127.0.0.1:5555")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds of silence before a retry")
    p.add_argument("--retries", type=int, default=2, help="retries (same request id: never run twice)")
    p.add_argument("--server-key", type=Path, metavar="FILE", help="the server's public .key (CURVE)")
    p.add_argument("--client-key", type=Path, metavar="FILE", help="this client's .key_secret (CURVE)")
    p.add_argument("--scene", action="store_true",
                   help="--image is a whole scene: tile it here, send the tiles (several at a time), merge the "
                        "answers as egx scene does (--task segment, grounding, caption or classify)")
    p.add_argument("--in-flight", type=int, default=4, help="--scene: tiles sent at once")
    add_tiling_arguments(p)


def add_keys_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, type=Path, metavar="DIR")
    p.add_argument("--name", action="append", default=[],
                   help="key pair name (repeatable; default: server and client)")


def cmd_serve(args: argparse.Namespace) -> int:
    from .server import ServeOptions, serve

    opts = ServeOptions(engines=args.engines, bind=args.bind, workers=args.workers, batch=args.batch,
                        staged=args.staged,
                        devices=tuple(d.strip() for d in args.devices.split(",") if d.strip()), threads=args.threads,
                        cache_bytes=int(args.cache_mb * 2**20), prefix_cache_bytes=int(args.prefix_cache_mb * 2**20),
                        max_queue=args.max_queue,
                        max_request_bytes=int(args.max_request_mb * 2**20), curve_secret=args.curve_secret,
                        allow=args.allow, insecure=args.insecure, grace_s=args.grace)
    return serve(opts)


def _query_scene(args: argparse.Namespace, server_key, client_keys) -> int:
    from concurrent.futures import ThreadPoolExecutor

    from earthgptx.errors import InputError
    from earthgptx.scene.cli import answer_scene
    from earthgptx.scene.source import SceneSource

    from .scene_client import ServedPredictor

    if args.text is None or args.point or args.box or args.scribble:
        raise InputError("--scene takes --text and no visual prompts (they would mean a place in one tile)")
    if args.task == "auto":
        args.task = "segment"
    SceneSource(args.image).close()  # a missing or unreadable scene is said before anything is sent
    predictor = ServedPredictor(args.connect, args.timeout, args.retries, server_key, client_keys)
    try:
        with ThreadPoolExecutor(max(1, args.in_flight), thread_name_prefix="egx-tile") as pool:
            return answer_scene(args, predictor, executor=pool, in_flight=max(1, args.in_flight))
    finally:
        predictor.close()


def cmd_query(args: argparse.Namespace) -> int:
    import numpy as np

    from earthgptx.commands import generation_options, preprocess_options, print_answer, request_text, text_sink
    from earthgptx.imageio import read_image, read_mask
    from earthgptx.processing import VisualPrompts

    from .client import Client
    from .security import SecurityError, load_keys

    if bool(args.server_key) != bool(args.client_key):
        raise SecurityError("CURVE needs both --server-key (the server's .key) and --client-key (your .key_secret)")
    server_key = load_keys(args.server_key, need_secret=False)[0] if args.server_key else None
    client_keys = load_keys(args.client_key, need_secret=True) if args.client_key else None
    text = request_text(args)
    if args.scene:
        return _query_scene(args, server_key, client_keys)
    raster = read_image(args.image)
    scribbles = [read_mask(s) for s in args.scribble]
    with Client(args.connect, args.timeout, args.retries, server_key, client_keys) as client:
        out = client.predict(np.asarray(raster.data), args.modality, text, args.point, args.box, scribbles,
                             args.task, generation_options(args), stream=args.stream, on_text=text_sink(args),
                             preprocess=preprocess_options(args))
    print_answer(out, args, raster, VisualPrompts(list(args.point), list(args.box), scribbles))
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    from .security import write_keys

    status = write_keys(args.out, tuple(args.name) or ("server", "client"))
    for name, what in status.items():
        print(f"{what}: {args.out / (name + '.key')} (public), {args.out / (name + '.key_secret')} (secret)")
    print("give the server its .key_secret (--curve-secret) and a folder of allowed clients' .key files "
          "(--allow); give each client the server's .key and its own .key_secret", file=sys.stderr)
    return 0
