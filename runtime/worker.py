"""A worker process: opens the engines of a build (one device), registers with the broker
for one stage, answers requests, heartbeats while idle, and reconnects when the broker
goes quiet (the Paranoid Pirate worker)."""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from dataclasses import dataclass

from earthgptx.image_cache import DEFAULT_CACHE_BYTES, DEFAULT_PREFIX_CACHE_BYTES

from .protocol import (DISCONNECT, FINAL, HEARTBEAT, HEARTBEAT_INTERVAL, HEARTBEAT_LIVENESS, PARTIAL, READY,
                       REQUEST, WORKER_PROTOCOL, Message)


@dataclass(frozen=True)
class WorkerOptions:
    engines: str
    endpoint: str  # the broker's worker endpoint (ipc://...)
    stage: str = "all"
    device: str = "cpu"  # cpu, cuda, cuda:K (K is made the only visible GPU)
    threads: int | None = None
    cache_bytes: int = DEFAULT_CACHE_BYTES
    prefix_cache_bytes: int = DEFAULT_PREFIX_CACHE_BYTES


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
    from .service import handle_safely

    info = json.dumps({"pid": os.getpid(), "device": opts.device}).encode()
    parent = os.getppid()
    link.send(READY, opts.stage.encode(), info)
    liveness = HEARTBEAT_LIVENESS
    next_beat = time.monotonic() + HEARTBEAT_INTERVAL
    while True:
        if link.sock.poll(int(HEARTBEAT_INTERVAL * 1000)):
            frames = link.sock.recv_multipart(copy=False)
            liveness = HEARTBEAT_LIVENESS
            command = frames[2].bytes if len(frames) > 2 else b""
            if command == DISCONNECT:
                return 0
            if command == REQUEST and len(frames) >= 6:  # [.., REQUEST, job id, scope, header, *buffers]
                job_id = frames[3].bytes

                def emit(reply: Message, final: bool) -> None:
                    link.send(FINAL if final else PARTIAL, job_id, *reply.frames())

                scope = frames[4].bytes.decode("ascii", errors="replace")
                handle_safely(handler, [f.buffer for f in frames[5:]], scope, emit)
        else:
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
