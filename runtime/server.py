"""``egx serve``: checks the build, starts the broker and the worker processes, keeps the
workers alive (a dead one is replaced), and shuts down cleanly on SIGINT/SIGTERM."""
from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from earthgptx.errors import EarthGPTXError
from earthgptx.image_cache import DEFAULT_CACHE_BYTES, DEFAULT_PREFIX_CACHE_BYTES

from .protocol import (BUSY_TIMEOUT, DEFAULT_MAX_QUEUE, DEFAULT_MAX_REQUEST_BYTES, FRONTEND_RCVHWM, FRONTEND_SNDHWM,
                       MAX_FRAME_FACTOR, MAX_SLOTS)
from .worker import WorkerOptions, run_worker


class ServeError(EarthGPTXError):
    """The server cannot start (bad build, unsafe bind, workers that fail)."""


@dataclass
class ServeOptions:
    engines: Path
    bind: str = "tcp://127.0.0.1:5555"
    workers: int = 1
    batch: int = 1  # requests a worker decodes together (its slots)
    staged: bool = False
    devices: tuple[str, ...] = ("cpu",)
    threads: int | None = None
    cache_bytes: int = DEFAULT_CACHE_BYTES
    prefix_cache_bytes: int = DEFAULT_PREFIX_CACHE_BYTES
    max_queue: int = DEFAULT_MAX_QUEUE
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    curve_secret: Path | None = None
    allow: Path | None = None
    insecure: bool = False
    grace_s: float = 10.0
    start_timeout_s: float = 300.0
    busy_timeout_s: float = BUSY_TIMEOUT
    stages: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        self.stages = ("vision", "language") if self.staged else ("all",)
        if self.workers < 1:
            raise ServeError(f"--workers must be >= 1, got {self.workers}")
        if not 1 <= self.batch <= MAX_SLOTS:
            raise ServeError(f"--batch must be 1 to {MAX_SLOTS}, got {self.batch}")
        if bool(self.curve_secret) != bool(self.allow):
            raise ServeError("CURVE needs both --curve-secret FILE (the server's .key_secret) and --allow DIR "
                             "(the folder of allowed clients' .key files)")


def _worker_main(opts: WorkerOptions) -> None:
    raise SystemExit(run_worker(opts))  # the process entry point, not library code


class Server:
    """Owns the sockets, the broker and the worker processes; ``run`` until ``stop``."""

    def __init__(self, opts: ServeOptions, log=sys.stderr) -> None:
        self.opts, self.log = opts, log
        self.stop_requested = threading.Event()
        self.processes: dict[int, tuple[multiprocessing.Process, WorkerOptions]] = {}
        self.ctx = self.frontend = self.backend = self.broker = self.auth = None
        self.tmp = None

    def start(self) -> None:
        import zmq

        from .broker import Broker
        from runners.manifest import load_manifest
        from .security import check_bind, load_keys

        opts = self.opts
        check_bind(opts.bind, opts.curve_secret is not None, opts.insecure)
        load_manifest(opts.engines)  # a missing, tampered or failed build stops here
        self.ctx = zmq.Context()
        self.frontend = self.ctx.socket(zmq.ROUTER)
        self.frontend.linger = 0
        self.frontend.router_mandatory = False  # replies to vanished clients are dropped; retries hit the done cache
        self.frontend.rcvhwm, self.frontend.sndhwm = FRONTEND_RCVHWM, FRONTEND_SNDHWM
        # a frame over twice the request limit: the connection is closed, nothing buffered, no reply;
        # up to that, the broker answers too_large (its first check is the message's total size)
        self.frontend.maxmsgsize = MAX_FRAME_FACTOR * opts.max_request_bytes
        if opts.curve_secret:
            from zmq.auth.thread import ThreadAuthenticator

            if not Path(opts.allow).is_dir():
                raise ServeError(f"--allow {opts.allow} is not a folder of client .key files")
            public, secret = load_keys(opts.curve_secret, need_secret=True)
            self.auth = ThreadAuthenticator(self.ctx)
            self.auth.start()
            self.auth.configure_curve(domain="*", location=str(opts.allow))
            self.frontend.curve_secretkey, self.frontend.curve_publickey = secret, public
            self.frontend.curve_server = True
        try:
            self.frontend.bind(opts.bind)
        except zmq.ZMQError as exc:
            raise ServeError(f"cannot bind {opts.bind}: {exc}") from None
        opts.bind = self.frontend.last_endpoint.decode()  # the port chosen for tcp://HOST:*
        self.tmp = tempfile.mkdtemp(prefix="egx-serve-")
        endpoint = f"ipc://{self.tmp}/workers"
        self.backend = self.ctx.socket(zmq.ROUTER)
        self.backend.linger = 0
        self.backend.bind(endpoint)
        self.broker = Broker(self.frontend, self.backend, opts.stages, opts.max_queue, opts.max_request_bytes,
                             opts.busy_timeout_s, on_dead=self._kill, log=self.log)
        for i in range(opts.workers):
            for stage in opts.stages:
                self._spawn(WorkerOptions(str(opts.engines), endpoint, stage, opts.devices[i % len(opts.devices)],
                                          opts.threads, opts.cache_bytes, opts.prefix_cache_bytes, opts.batch))
        self._wait_ready()

    def _spawn(self, wopts: WorkerOptions) -> None:
        proc = multiprocessing.get_context("spawn").Process(target=_worker_main, args=(wopts,), daemon=True)
        proc.start()
        self.processes[proc.pid] = (proc, wopts)

    def _kill(self, pid: int) -> None:
        entry = self.processes.get(pid)
        if entry is not None and entry[0].is_alive():
            entry[0].kill()

    def _wait_ready(self) -> None:
        expected = len(self.processes)
        deadline = time.monotonic() + self.opts.start_timeout_s
        while self.broker.ready_workers() < expected:
            self.broker.poll_once(0.1)
            if self.broker.startup_errors:
                raise ServeError("a worker could not start: " + self.broker.startup_errors[0])
            dead = [p for p, _ in self.processes.values() if not p.is_alive()]
            if dead:
                raise ServeError(f"worker process {dead[0].pid} exited with status {dead[0].exitcode} "
                                 "before it was ready (see its messages above)")
            if time.monotonic() > deadline:
                raise ServeError(f"{self.broker.ready_workers()} of {expected} workers ready after "
                                 f"{self.opts.start_timeout_s:g} s")

    def _supervise(self) -> None:
        """Replace worker processes that exited; fail over their requests."""
        for pid, (proc, wopts) in list(self.processes.items()):
            if not proc.is_alive():
                proc.join(0)
                del self.processes[pid]
                print(f"egx serve: worker {pid} exited ({proc.exitcode}); starting another", file=self.log)
                self.broker.worker_died(pid)
                if not self.stop_requested.is_set():
                    self._spawn(wopts)

    def run(self) -> None:
        last_check = 0.0
        while not self.stop_requested.is_set():
            self.broker.poll_once(0.1)
            if time.monotonic() - last_check > 0.1:
                self._supervise()
                last_check = time.monotonic()

    def stop(self) -> None:
        self.stop_requested.set()

    def close(self) -> None:
        """Drain (answer or fail every accepted request), stop the workers, free everything."""
        if self.broker is not None:
            self.broker.drain(self.opts.grace_s)
        for proc, _ in self.processes.values():
            proc.join(2.0)
            if proc.is_alive():
                proc.kill()
                proc.join(2.0)
        self.processes.clear()
        if self.auth is not None:
            self.auth.stop()
        for sock in (self.frontend, self.backend):
            if sock is not None:
                sock.close(0)
        if self.ctx is not None:  # destroy, not term: a socket left open anywhere must not hang the shutdown
            self.ctx.destroy(linger=0)
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)


def serve(opts: ServeOptions, log=sys.stderr) -> int:
    """Run the server until SIGINT/SIGTERM. Raises ``ServeError``/``ManifestError`` when it
    cannot start."""
    server = Server(opts, log)
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in previous:
        signal.signal(s, lambda *_: server.stop())
    try:
        server.start()
        mode = "staged (vision | language)" if opts.staged else "one process per worker"
        print(f"egx serve: {opts.engines} on {opts.bind}, {opts.workers} worker(s), {mode}, "
              f"{'CURVE' if opts.curve_secret else 'no encryption'}; pid {os.getpid()}", file=log, flush=True)
        server.run()
        print(f"egx serve: stopping ({len(server.broker.inflight)} request(s) in flight)", file=log, flush=True)
        return 0
    finally:
        server.close()
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextmanager
def serve_in_thread(opts: ServeOptions, log=sys.stderr):
    """A running ``Server`` in a thread of this process (its workers are processes), for
    benchmarks and tests; yields it once its workers are ready, stops it on exit."""
    server = Server(opts, log)
    started, failure = threading.Event(), []

    def main() -> None:
        try:
            server.start()
        except BaseException as exc:  # re-raised in the caller's thread below
            failure.append(exc)
        started.set()
        if not failure:
            server.run()

    thread = threading.Thread(target=main, name="egx-serve", daemon=True)
    thread.start()
    if not started.wait(opts.start_timeout_s + 60):  # start() has its own deadline: this is a safety net
        server.stop()
        raise ServeError(f"the server did not start within {opts.start_timeout_s + 60:g} s")
    try:
        if failure:
            raise failure[0]
        yield server
    finally:
        server.stop()
        thread.join(opts.grace_s + 30)
        server.close()
