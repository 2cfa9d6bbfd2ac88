"""Benchmark rows for the ZeroMQ path, side by side with the in-process pipeline on the
same engines: the transport overhead (a ``ping`` carrying a 448 px RGB image through
broker and worker), ``click_to_mask`` and ``end_to_end_segmentation`` through the
server, and throughput with 1 and 2 workers."""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np

from .bench import Row, timed

OVERHEAD_IMAGE = (448, 448, 3)


def _perturbed(image: np.ndarray, i: int) -> np.ndarray:
    """A copy that differs in one pixel: a new content id, so the server encodes it again
    (what ``clear_cache`` does in process)."""
    out = image.copy()
    out.reshape(-1)[0] = (int(out.reshape(-1)[0]) + 1 + i) % 256
    return out


def _throughput(address: str, image: np.ndarray, key: str, clients: int, per_client: int) -> tuple[float, int]:
    from .client import Client

    errors = []

    def one(k: int) -> None:
        with Client(address, timeout_s=120, retries=0) as c:
            c.uploaded.add((key, "sar"))
            for point in _segment_requests(clients * per_client)[k::clients]:
                try:
                    c.predict(image, "sar", "Segment the ship.", [point], task="segment",
                              generation={"max_new_tokens": 8})
                except Exception as exc:  # counted and reported, not hidden
                    errors.append(exc)

    threads = [threading.Thread(target=one, args=(k,)) for k in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start, len(errors)


def _segment_requests(n: int, seed: int = 0) -> list[tuple[float, float]]:
    return [(float(x), float(y)) for x, y in np.random.default_rng(seed).integers(0, 800, (n, 2))]


def bench_zmq(folder: Path, precision: str, image: np.ndarray, repeats: int, predictor, log) -> tuple[list[Row], dict]:
    """Rows (backend ``zmq``) and a throughput summary for the build in ``folder``;
    ``predictor`` (in process, same build) runs the throughput requests one after another."""
    from earthgptx.generation import GenerationConfig
    from earthgptx.processing import VisualPrompts

    from .client import Client
    from .server import ServeOptions, serve_in_thread

    rows, summary = [], {}
    clients, per_client = 4, max(2, repeats // 2)
    n = clients * per_client
    predictor.encode_image(image, "sar")
    start = time.perf_counter()
    for point in _segment_requests(n):
        predictor.predict(image, "sar", "Segment the ship.", VisualPrompts([point], [], []), task="segment",
                          generation=GenerationConfig(max_new_tokens=8))
    seconds = time.perf_counter() - start
    rows.append(Row("throughput_in_process", "onnxruntime", precision, [seconds * 1e3 / n]))
    summary["in_process"] = {"requests": n, "seconds": round(seconds, 3), "requests_per_s": round(n / seconds, 3)}
    payload = np.random.default_rng(0).integers(0, 256, OVERHEAD_IMAGE, dtype=np.uint8)
    for workers in (1, 2):
        opts = ServeOptions(engines=folder, bind="tcp://127.0.0.1:*", workers=workers,
                            threads=max(1, (os.cpu_count() or 1) // workers))
        with serve_in_thread(opts, log) as server, Client(server.opts.bind, timeout_s=120, retries=0) as c:
            key = c.upload(image, "sar")
            if workers == 1:
                rows.append(Row("zmq_overhead", "zmq", precision, timed(lambda: c.ping(payload), repeats * 5, 3)))
                rng = np.random.default_rng(0)
                clicks = iter(rng.integers(0, 800, (repeats + 1, 2)).tolist())
                rows.append(Row("click_to_mask", "zmq", precision,
                                timed(lambda: c.predict(image, "sar", "", [next(clicks)], task="click"), repeats)))
                counter = iter(range(10**6))
                rows.append(Row("end_to_end_segmentation", "zmq", precision, timed(
                    lambda: c.predict(_perturbed(image, next(counter)), "sar", "Segment the ship.", [(400, 400)],
                                      task="segment", generation={"max_new_tokens": 8}),
                    max(3, repeats // 2))))
            seconds, errors = _throughput(server.opts.bind, image, key, clients, per_client)
            rows.append(Row(f"throughput_{workers}_worker{'s' if workers > 1 else ''}", "zmq", precision,
                            [seconds * 1e3 / n]))
            summary[f"{workers}_workers"] = {"requests": n, "clients": clients, "seconds": round(seconds, 3),
                                             "requests_per_s": round(n / seconds, 3), "errors": errors,
                                             "threads_per_worker": opts.threads}
    return rows, summary
