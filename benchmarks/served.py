"""Benchmark rows for the ZeroMQ path, side by side with the in-process pipeline on the
same engines: the transport overhead (a ``ping`` carrying a 448 px RGB image through
broker and worker), ``click_to_mask`` (new points in an encoded zoom window),
``click_to_mask_new_window`` (points anywhere: mostly a window not encoded yet, which the
client sends the image again for) and ``end_to_end_segmentation`` through the server, and
throughput (requests/s with 4 concurrent clients: rows ``throughput_4_clients``
with ``config`` and ``requests_per_s``) with 1 worker, 1 worker decoding up to 4 requests
together (``--batch 4``) and 2 workers on a cached image, and with 1 worker vs ``--staged``
when every request brings a new image."""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np

from .timing import Row, timed

OVERHEAD_IMAGE = (448, 448, 3)


def _perturbed(image: np.ndarray, i: int) -> np.ndarray:
    """A copy that differs in one pixel: a new content id, so the server encodes it again
    (what ``clear_cache`` does in process)."""
    out = image.copy()
    out.reshape(-1)[0] = (int(out.reshape(-1)[0]) + 1 + i) % 256
    return out


def _throughput(address: str, image: np.ndarray, clients: int, per_client: int, size: int,
                new_images: bool = False) -> tuple[float, int]:
    """``clients`` threads, each sending ``per_client`` segment requests at points of one zoom
    window (``points_in_window``; ``size``: the model's input side); on the image each client
    uploaded and asked once before the clock starts (cached images and their prompt prefixes
    are each client's own, so each client's first prompt would otherwise pay a whole prefill:
    4 of 12 requests), or each on a new image (the vision encoder runs every time)."""
    from runtime.client import Client

    errors = []
    conns = [Client(address, timeout_s=120, retries=0) for _ in range(clients)]
    for c in conns:
        c.upload(image, "sar")
        if not new_images:
            c.predict(image, "sar", "Segment the ship.", [ANCHOR], task="segment",
                      generation={"max_new_tokens": 8})

    def one(k: int) -> None:
        c = conns[k]  # (a socket moves to this thread once, at its start)
        for i, point in enumerate(points_in_window(clients * per_client, size, image.shape)[k::clients]):
            img = _perturbed(image, 1000 + k * per_client + i) if new_images else image
            try:
                c.predict(img, "sar", "Segment the ship.", [point], task="segment", generation={"max_new_tokens": 8})
            except Exception as exc:  # counted and reported, not hidden
                errors.append(exc)

    threads = [threading.Thread(target=one, args=(k,)) for k in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    for c in conns:
        c.close()
    return seconds, len(errors)


ANCHOR = (400.0, 400.0)  # the benchmark's point on the 800 px SAR chip


def points_in_window(n: int, size: int, shape: tuple[int, ...] = (800, 800),
                     seed: int = 0) -> list[tuple[float, float]]:
    """``n`` random points that ``Predictor.predict`` zooms into the same window as ``ANCHOR``
    (``processing.zoom_window``; anywhere on the image when it is not zoomed): new prompts on an
    already-encoded window, as a user clicks around one place."""
    from earthgptx.processing import VisualPrompts, zoom_factor, zoom_window

    h, w = shape[:2]
    factor = zoom_factor("sar")  # the benchmark's requests are on a SAR chip
    window = zoom_window(h, w, VisualPrompts([ANCHOR], [], []), size, factor)
    x0, y0, x1, y1 = window or (0, 0, w, h)
    rng = np.random.default_rng(seed)
    out: list[tuple[float, float]] = []
    while len(out) < n:
        p = (float(rng.integers(x0, x1)), float(rng.integers(y0, y1)))
        if zoom_window(h, w, VisualPrompts([p], [], []), size, factor) == window:
            out.append(p)
    return out


def points_anywhere(n: int, shape: tuple[int, ...] = (800, 800), seed: int = 0) -> list[tuple[float, float]]:
    """``n`` random points on the image: on a zoomed image most fall in a window not encoded yet."""
    h, w = shape[:2]
    rng = np.random.default_rng(seed)
    return [(float(rng.integers(w)), float(rng.integers(h))) for _ in range(n)]


def bench_zmq(folder: Path, precision: str, image: np.ndarray, repeats: int, predictor, log) -> tuple[list[Row], dict]:
    """Rows (backend ``zmq``) and a throughput summary for the build in ``folder``;
    ``predictor`` (in process, same build) runs the throughput requests one after another."""
    from earthgptx.generation import GenerationConfig
    from earthgptx.processing import VisualPrompts

    from runtime.client import Client
    from runtime.server import ServeOptions, serve_in_thread

    rows, summary = [], {}
    clients, per_client = 4, max(2, repeats // 2)
    n = clients * per_client
    size = predictor.config.vision.image_size
    predictor.predict(image, "sar", "Segment the ship.", VisualPrompts([ANCHOR], [], []), task="segment",
                      generation=GenerationConfig(max_new_tokens=8))  # cached as the clients' images are
    start = time.perf_counter()
    for point in points_in_window(n, size, image.shape):
        predictor.predict(image, "sar", "Segment the ship.", VisualPrompts([point], [], []), task="segment",
                          generation=GenerationConfig(max_new_tokens=8))
    seconds = time.perf_counter() - start
    rows.append(Row("throughput_in_process", "onnxruntime", precision, [seconds * 1e3 / n]))
    summary["in_process"] = {"requests": n, "seconds": round(seconds, 3), "requests_per_s": round(n / seconds, 3)}
    payload = np.random.default_rng(0).integers(0, 256, OVERHEAD_IMAGE, dtype=np.uint8)
    configs = (("1_worker", dict(workers=1), False), ("1_worker_batch_4", dict(workers=1, batch=4), False),
               ("2_workers", dict(workers=2), False), ("new_images_1_worker", dict(workers=1), True),
               ("new_images_staged", dict(workers=1, staged=True), True))
    for name, config, new_images in configs:
        workers = config["workers"] * (2 if config.get("staged") else 1)
        opts = ServeOptions(engines=folder, bind="tcp://127.0.0.1:*", threads=max(1, (os.cpu_count() or 1) // workers),
                            **config)
        with serve_in_thread(opts, log) as server, Client(server.opts.bind, timeout_s=120, retries=0) as c:
            c.upload(image, "sar")
            if name == "1_worker":
                rows.append(Row("zmq_overhead", "zmq", precision, timed(lambda: c.ping(payload), repeats * 5, 3)))
                c.predict(image, "sar", "", [ANCHOR], task="click")  # the window around ANCHOR, encoded
                clicks = iter(points_in_window(repeats + 1, size, image.shape))
                rows.append(Row("click_to_mask", "zmq", precision,
                                timed(lambda: c.predict(image, "sar", "", [next(clicks)], task="click"), repeats)))
                far = iter(points_anywhere(repeats + 1, image.shape, seed=1))
                rows.append(Row("click_to_mask_new_window", "zmq", precision,
                                timed(lambda: c.predict(image, "sar", "", [next(far)], task="click"), repeats)))
                counter = iter(range(10**6))
                rows.append(Row("end_to_end_segmentation", "zmq", precision, timed(
                    lambda: c.predict(_perturbed(image, next(counter)), "sar", "Segment the ship.", [(400, 400)],
                                      task="segment", generation={"max_new_tokens": 8}),
                    max(3, repeats // 2))))
            seconds, errors = _throughput(server.opts.bind, image, clients, per_client, size, new_images)
            rows.append(Row(f"throughput_{name}", "zmq", precision, [seconds * 1e3 / n]))
            rows.append(Row("throughput_4_clients", "zmq", precision, [seconds * 1e3 / n],
                            {"config": name, "requests_per_s": round(n / seconds, 3)}))
            summary[name] = {"requests": n, "clients": clients, "seconds": round(seconds, 3),
                             "requests_per_s": round(n / seconds, 3), "errors": errors, "processes": workers,
                             "threads_per_process": opts.threads, "new_image_per_request": new_images}
    return rows, summary
