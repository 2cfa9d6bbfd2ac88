"""A worker process: opens the engines of a build (one device), registers with the broker
for one stage, answers requests, heartbeats while idle, and reconnects when the broker
goes quiet (the Paranoid Pirate worker)."""
from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass

from earthgptx.image_cache import DEFAULT_CACHE_BYTES, DEFAULT_PREFIX_CACHE_BYTES

from .protocol import (DISCONNECT, FINAL, HEARTBEAT, HEARTBEAT_INTERVAL, HEARTBEAT_LIVENESS, PARTIAL, READY,
                       REQUEST, WORKER_PROTOCOL, ErrorCode, Message, error_header)


@dataclass(frozen=True)
class WorkerOptions:
    engines: str
    endpoint: str  # the broker's worker endpoint (ipc://...)
    stage: str = "all"
    device: str = "cpu"  # cpu, cuda, cuda:K (K is made the only visible GPU)
    threads: int | None = None
    cache_bytes: int = DEFAULT_CACHE_BYTES
    prefix_cache_bytes: int = DEFAULT_PREFIX_CACHE_BYTES
    slots: int = 1  # requests in flight at once; > 1: their decode steps are batched (language stages)


class _Link:
    """The worker's DEALER to the broker; ``reconnect`` replaces a confused socket."""

    def __init__(self, ctx, endpoint: str) -> None:
        self.ctx, self.endpoint, self.sock = ctx, endpoint, None
        self.reconnect()

    def reconnect(self) -> None:
        import zmq

        if self.sock is not None:
            self.sock.close(0)
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.connect(self.endpoint)

    def send(self, command: bytes, *frames) -> None:
        self.sock.send_multipart([b"", WORKER_PROTOCOL, command, *frames], copy=False)

    def close(self) -> None:
        self.sock.close(0)


def run_worker(opts: WorkerOptions) -> int:
    """The worker's main (a spawned process). Returns an exit status."""
    import zmq

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the server coordinates
    device = opts.device
    if device.startswith("cuda:"):
        os.environ["CUDA_VISIBLE_DEVICES"] = device.split(":", 1)[1]
        device = "cuda"
    ctx = zmq.Context()
    link = _Link(ctx, opts.endpoint)
    try:
        from earthgptx.errors import EarthGPTXError
        from runners.engines import open_predictor
        from .service import RequestHandler

        try:
            handler = RequestHandler(open_predictor(opts.engines, device, threads=opts.threads,
                                                    cache_bytes=opts.cache_bytes,
                                                    prefix_cache_bytes=opts.prefix_cache_bytes), opts.stage)
        except EarthGPTXError as exc:
            link.send(DISCONNECT, json.dumps({"error": f"worker {os.getpid()} ({opts.device}): {exc}"}).encode())
            time.sleep(0.2)  # let the message leave before the socket closes
            return 1
        return _serve(link, opts, handler)
    finally:
        link.close()
        ctx.term()


def _serve(link: _Link, opts: WorkerOptions, handler) -> int:
    """The worker's loop. With ``slots`` > 1 (and a stage that decodes) it takes up to that
    many requests at once: each new one is prefilled as it arrives and joins a
    ``DecodeBatch``, whose decode steps run between polls of the socket, one ``llm`` call for
    all of them; each request streams and ends on its own."""
    from earthgptx.generation import DecodeBatch

    from .service import handle_safely, start_safely

    slots = opts.slots if opts.stage != "vision" and handler.predictor.text_generator is None else 1
    info = json.dumps({"pid": os.getpid(), "device": opts.device, "slots": slots}).encode()
    parent = os.getppid()
    link.send(READY, opts.stage.encode(), info)
    liveness = HEARTBEAT_LIVENESS
    next_beat = time.monotonic() + HEARTBEAT_INTERVAL
    batch = DecodeBatch(handler.predictor.runners["llm"], handler.predictor.config.llm)
    started = {}  # job id -> service.Started, for requests in the batch
    while True:
        got = link.sock.poll(0 if batch.live else int(HEARTBEAT_INTERVAL * 1000))
        if got:
            frames = link.sock.recv_multipart(copy=False)
            liveness = HEARTBEAT_LIVENESS
            command = frames[2].bytes if len(frames) > 2 else b""
            if command == DISCONNECT:
                return 0
            if command == REQUEST and len(frames) >= 6:  # [.., REQUEST, job id, scope, header, *buffers]
                job_id = frames[3].bytes

                def emit(reply: Message, final: bool, job_id=job_id) -> None:
                    link.send(FINAL if final else PARTIAL, job_id, *reply.frames())

                scope = frames[4].bytes.decode("ascii", errors="replace")
                request = [f.buffer for f in frames[5:]]
                if slots == 1:
                    handle_safely(handler, request, scope, emit)
                else:
                    _join(batch, started, job_id, start_safely(handler, request, scope, emit))
        if batch.live:  # a decode step between messages, so that new requests never starve running ones
            _step(batch, started)
        elif not got:
            liveness -= 1
            if liveness == 0 and os.getppid() != parent:  # the server is gone: so are we
                return 0
            if liveness == 0:  # the broker is gone or confused: reconnect and register again
                print(f"egx worker {os.getpid()}: broker silent, reconnecting", file=sys.stderr)
                link.reconnect()
                link.send(READY, opts.stage.encode(), info)
                liveness = HEARTBEAT_LIVENESS
        if time.monotonic() >= next_beat:
            link.send(HEARTBEAT)
            next_beat = time.monotonic() + HEARTBEAT_INTERVAL


def _join(batch, started: dict, job_id: bytes, start) -> None:
    """A started request (``service.Started``; ``None``: answered already) into the batch:
    prefilled now; completed at once when there is nothing to decode."""
    from .service import safely

    if start is None:
        return
    if start.pending.steps is None:
        safely(lambda: start.complete(None), start.emit)
        return
    generated = safely(lambda: batch.add(job_id, start.pending.steps), start.emit)
    if job_id not in batch.sequences:  # ended at its prefill, or failed (answered by safely)
        batch.pop_widest(job_id)
        if generated is not None:
            safely(lambda: start.complete(generated, 1), start.emit)
        return
    started[job_id] = start


def _step(batch, started: dict) -> None:
    """One decode step of the batch; requests that ended are completed. If the step fails,
    every request in it gets the failure as its final reply and leaves the batch."""
    from .service import safely

    try:
        ended = batch.step()
    except Exception as exc:  # the batch's boundary: each request is answered, the worker serves on
        traceback.print_exc(file=sys.stderr)
        for job_id in list(batch.sequences):
            batch.drop(job_id)
            started.pop(job_id).emit(Message(error_header(None, ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")),
                                     True)
        return
    for job_id, generated in ended.items():
        start, widest = started.pop(job_id), batch.pop_widest(job_id)
        safely(lambda: start.complete(generated, widest), start.emit)
