"""The broker: clients on a ROUTER (``--bind``), workers on a private ROUTER, requests
queued per stage with a bound, heartbeats, retries of requests whose worker died, and
replies cached by request id so that a client's retry is never executed twice.

Single-threaded: ``poll_once`` does one round of I/O; the server calls it in a loop.
"""
from __future__ import annotations

import json
import sys
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Callable

import zmq

from .protocol import (DISCONNECT, FINAL, HEARTBEAT, HEARTBEAT_INTERVAL, HEARTBEAT_LIVENESS, MAX_FRAMES, PARTIAL,
                       PROTOCOL, PROTOCOL_FAMILY, READY, REQUEST, SERVICE, TASKS, WORKER_PROTOCOL, ErrorCode,
                       ProtocolError, check_request_id, error_header, parse_header, parse_message)

MAX_ATTEMPTS = 2  # a request whose worker died is run once more, on another worker
DONE_CACHE = 2048  # final replies kept for clients that retry (and image ids remembered)
DONE_CACHE_BYTES = 64 * 2**20


@dataclass
class Job:
    """One accepted request. ``frames``: ``[header JSON, *buffers]`` for the current stage."""

    id: str
    client: bytes
    frames: list
    stage: int = 0
    attempts: int = 0
    streamed: bool = False
    image_id: str | None = None
    accepted: float = field(default_factory=time.monotonic)


@dataclass
class Worker:
    identity: bytes
    stage: str
    pid: int
    expiry: float
    job: Job | None = None


class Broker:
    """``stages``: the worker stages a request passes through in order (``("all",)``, or
    ``("vision", "language")`` in staged mode). ``max_queue``: queued requests per stage
    beyond which clients get a ``busy`` reply. ``on_dead(pid)``: called for a worker
    declared dead by heartbeat (the server kills and replaces it)."""

    def __init__(self, frontend: zmq.Socket, backend: zmq.Socket, stages: tuple[str, ...] = ("all",),
                 max_queue: int = 32, max_request_bytes: int = 256 * 2**20, busy_timeout: float = 120.0,
                 on_dead: Callable[[int], None] | None = None, log=sys.stderr) -> None:
        self.frontend, self.backend = frontend, backend
        self.stages = stages
        self.max_queue = max_queue
        self.max_request_bytes = max_request_bytes
        self.busy_timeout = busy_timeout
        self.on_dead = on_dead
        self.log = log
        self.queues: dict[str, deque[Job]] = {s: deque() for s in stages}
        self.workers: dict[bytes, Worker] = {}
        self.idle: dict[str, list[bytes]] = {s: [] for s in stages}
        self.inflight: dict[str, Job] = {}
        self.done: OrderedDict[str, list] = OrderedDict()
        self.done_bytes = 0
        self.affinity: OrderedDict[str, bytes] = OrderedDict()  # image id -> the worker that cached it
        self.startup_errors: list[str] = []
        self.accepting = True
        self.answered = 0
        self.poller = zmq.Poller()
        self.poller.register(frontend, zmq.POLLIN)
        self.poller.register(backend, zmq.POLLIN)
        self.next_heartbeat = time.monotonic() + HEARTBEAT_INTERVAL

    # -- the loop -------------------------------------------------------------------
    def poll_once(self, timeout_s: float = HEARTBEAT_INTERVAL) -> None:
        events = dict(self.poller.poll(int(timeout_s * 1000)))
        if events.get(self.backend) == zmq.POLLIN:
            for _ in range(1000):
                try:
                    parts = self.backend.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                try:
                    self._on_worker(parts)
                except (ValueError, KeyError, TypeError, IndexError) as exc:  # reported; the broker keeps serving
                    print(f"egx serve: ignored a malformed worker message: {exc!r}", file=self.log)
        if events.get(self.frontend) == zmq.POLLIN:
            for _ in range(1000):
                try:
                    self._on_client(self.frontend.recv_multipart(zmq.NOBLOCK, copy=False))
                except zmq.Again:
                    break
        self._dispatch()
        self._heartbeat()

    def ready_workers(self, stage: str | None = None) -> int:
        return sum(1 for w in self.workers.values() if stage is None or w.stage == stage)

    # -- clients --------------------------------------------------------------------
    def _reply(self, client: bytes, command: bytes, frames: list) -> None:
        try:
            self.frontend.send_multipart([client, b"", PROTOCOL, command, SERVICE, *frames], zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as exc:  # (a gone or full client is dropped by ROUTER silently: its retry is answered)
            print(f"egx serve: cannot reply to a client: {exc}", file=self.log)

    def _error(self, client: bytes, request_id, code: str, message: str) -> None:
        self._reply(client, FINAL, [json.dumps(error_header(request_id, code, message)).encode()])

    def _on_client(self, parts: list) -> None:
        client, frames = parts[0].bytes, [p.buffer for p in parts[1:]]
        request_id = None
        try:
            header = self._envelope(frames)
            request_id = check_request_id(header)
            job = self._admit(client, request_id, header, frames)
        except ProtocolError as exc:
            self._error(client, request_id, exc.code, exc.message)
            return
        if job is not None:
            self.queues[self.stages[0]].append(job)

    def _envelope(self, frames: list) -> dict:
        """Check the frames around the header; returns the header."""
        if len(frames) < 5 or len(frames[0]) != 0:
            raise ProtocolError(ErrorCode.MALFORMED, "expected frames [empty, protocol, command, service, header, "
                                                     "*buffers] (docs/protocol.md)")
        protocol = bytes(frames[1])
        if protocol != PROTOCOL:
            if protocol.startswith(PROTOCOL_FAMILY):
                raise ProtocolError(ErrorCode.BAD_VERSION, f"this server speaks {PROTOCOL.decode()}, "
                                                           f"the request is {protocol.decode(errors='replace')}")
            raise ProtocolError(ErrorCode.MALFORMED, f"unknown protocol {protocol[:16]!r}; expected {PROTOCOL!r}")
        if bytes(frames[2]) != REQUEST:
            raise ProtocolError(ErrorCode.MALFORMED, f"unknown command {bytes(frames[2])[:4]!r}; clients send REQUEST")
        if len(frames) > MAX_FRAMES:
            raise ProtocolError(ErrorCode.MALFORMED, f"{len(frames)} frames; at most {MAX_FRAMES}")
        return parse_header(frames[4])

    def _admit(self, client: bytes, request_id: str, header: dict, frames: list) -> Job | None:
        """A new job, or None when the request needs no new work (a client's retry);
        raises ProtocolError for an error reply."""
        if bytes(frames[3]) != SERVICE:
            raise ProtocolError(ErrorCode.UNKNOWN_SERVICE, f"no service {bytes(frames[3])[:32]!r} here; "
                                                           f"use {SERVICE.decode()!r}")
        size = sum(len(f) for f in frames[4:])
        if size > self.max_request_bytes:
            raise ProtocolError(ErrorCode.TOO_LARGE, f"request is {size} bytes; this server takes at most "
                                                     f"{self.max_request_bytes} (serve --max-request-mb)")
        if request_id in self.done:  # a retry of an answered request: the same answer again
            self.done.move_to_end(request_id)
            self._reply(client, FINAL, self.done[request_id])
            return None
        if request_id in self.inflight:  # a retry of a running request: answer the new socket
            self.inflight[request_id].client = client
            return None
        if header.get("task") not in TASKS:
            raise ProtocolError(ErrorCode.UNKNOWN_TASK, f"unknown task {header.get('task')!r}; "
                                                        f"use one of: {', '.join(TASKS)}")
        msg = parse_message(frames[4:])  # buffers described correctly?
        if not self.accepting:
            raise ProtocolError(ErrorCode.SHUTTING_DOWN, "the server is shutting down; try another or retry later")
        if len(self.queues[self.stages[0]]) >= self.max_queue:
            raise ProtocolError(ErrorCode.BUSY, f"{self.max_queue} requests are queued; retry later")
        image = msg.header.get("image")
        image_id = image.get("id") if isinstance(image, dict) and "image" not in msg.tensors else None
        job = Job(request_id, client, list(frames[4:]), image_id=image_id if isinstance(image_id, str) else None)
        self.inflight[request_id] = job
        return job

    def _finish(self, job: Job, frames: list) -> None:
        """The one final reply of ``job``."""
        self.inflight.pop(job.id, None)
        frames = [bytes(f) for f in frames]  # kept: own the bytes, not a view of a received message
        self.done[job.id] = frames
        self.done_bytes += sum(len(f) for f in frames)
        while len(self.done) > DONE_CACHE or self.done_bytes > DONE_CACHE_BYTES:
            self.done_bytes -= sum(len(f) for f in self.done.popitem(last=False)[1])
        self.answered += 1
        self._reply(job.client, FINAL, frames)

    def fail(self, job: Job, code: str, message: str) -> None:
        self._finish(job, [json.dumps(error_header(job.id, code, message)).encode()])

    # -- workers --------------------------------------------------------------------
    def _send_worker(self, identity: bytes, command: bytes, *frames) -> None:
        self.backend.send_multipart([identity, b"", WORKER_PROTOCOL, command, *frames], copy=False)

    def _on_worker(self, parts: list) -> None:
        identity = parts[0].bytes
        frames = [p.bytes if i < 4 else p.buffer for i, p in enumerate(parts[1:])]
        if len(frames) < 3 or frames[1] != WORKER_PROTOCOL:
            print(f"egx serve: ignored a malformed worker message ({len(frames)} frames)", file=self.log)
            return
        command, worker = frames[2], self.workers.get(identity)
        if command == READY:
            self._on_ready(identity, frames)
        elif command == DISCONNECT:
            info = json.loads(bytes(frames[3])) if len(frames) > 3 else {}
            if info.get("error"):
                self.startup_errors.append(info["error"])
            if worker is not None:
                self._remove(worker, "disconnected")
        elif worker is None:  # unknown (e.g. declared dead, then woke up): make it register again
            self._send_worker(identity, DISCONNECT)
        elif command == HEARTBEAT:
            worker.expiry = time.monotonic() + HEARTBEAT_INTERVAL * HEARTBEAT_LIVENESS
        elif command in (PARTIAL, FINAL) and len(frames) >= 5:
            self._on_result(worker, command, frames[3].decode(errors="replace"), frames[4:])

    def _on_ready(self, identity: bytes, frames: list) -> None:
        info = json.loads(bytes(frames[4])) if len(frames) > 4 else {}
        stage = bytes(frames[3]).decode(errors="replace")
        if stage not in self.stages:
            self._send_worker(identity, DISCONNECT)
            return
        old = self.workers.get(identity)
        if old is not None:
            self._remove(old, "re-registered")
        self.workers[identity] = Worker(identity, stage, int(info.get("pid", 0)),
                                        time.monotonic() + HEARTBEAT_INTERVAL * HEARTBEAT_LIVENESS)
        self.idle[stage].append(identity)

    def _on_result(self, worker: Worker, command: bytes, job_id: str, frames: list) -> None:
        job = worker.job
        worker.expiry = time.monotonic() + self.busy_timeout
        if job is None or job.id != job_id:
            return  # a late reply for a request already failed over; the retry answers it
        header = json.loads(bytes(frames[0]))
        header["id"] = job.id
        out = [json.dumps(header, separators=(",", ":")).encode(), *frames[1:]]
        if command == PARTIAL:
            job.streamed = True
            self._reply(job.client, PARTIAL, out)
            return
        worker.job = None
        worker.expiry = time.monotonic() + HEARTBEAT_INTERVAL * HEARTBEAT_LIVENESS
        self.idle[worker.stage].append(worker.identity)
        result = header.get("result") if isinstance(header.get("result"), dict) else {}
        image_id = header.get("image_id") or result.get("image_id")
        if isinstance(image_id, str) and worker.stage == self.stages[0]:  # the stage that caches encodings
            self.affinity[image_id] = worker.identity
            self.affinity.move_to_end(image_id)
            while len(self.affinity) > DONE_CACHE:
                self.affinity.popitem(last=False)
        if header.get("event") == "encoded" and job.stage + 1 < len(self.stages):
            self._hand_on(job, header, frames)
            return
        self._finish(job, out)

    def _hand_on(self, job: Job, encoded: dict, frames: list) -> None:
        """Vision stage done: the language stage gets the request with the encoding
        instead of the image (scribbles and prompts travel on)."""
        msg = parse_message(job.frames)
        msg.tensors.pop("image", None)
        enc = parse_message([json.dumps({k: v for k, v in encoded.items() if k != "id"}).encode(), *frames[1:]])
        msg.tensors.update(enc.tensors)
        msg.header["encoded"] = enc.header
        job.frames = msg.frames()
        job.stage += 1
        job.attempts = 0
        self.queues[self.stages[job.stage]].appendleft(job)

    def _remove(self, worker: Worker, why: str) -> None:
        self.workers.pop(worker.identity, None)
        if worker.identity in self.idle[worker.stage]:
            self.idle[worker.stage].remove(worker.identity)
        job, worker.job = worker.job, None
        if job is None:
            return
        if job.streamed or job.attempts >= MAX_ATTEMPTS or not self.accepting:
            self.fail(job, ErrorCode.WORKER_LOST, f"the worker running this request {why} "
                                                  f"(after {job.attempts} attempt(s)); send it again with a new id")
        else:
            print(f"egx serve: worker {worker.pid} {why}; request {job.id} goes to another worker", file=self.log)
            self.queues[worker.stage].appendleft(job)

    def worker_died(self, pid: int) -> None:
        """The server saw worker process ``pid`` exit."""
        for w in list(self.workers.values()):
            if w.pid == pid:
                self._remove(w, "died")

    def _dispatch(self) -> None:
        """Queued jobs to idle workers. A job that names a cached image waits for the worker
        that cached it (while that worker lives), so later prompts skip the vision encoder."""
        for stage in self.stages:
            queue, idle = self.queues[stage], self.idle[stage]
            waiting: list[Job] = []
            while queue and idle:
                job = queue.popleft()
                if job.id not in self.inflight:
                    continue
                preferred = self.affinity.get(job.image_id) if job.image_id else None
                owner = self.workers.get(preferred) if preferred else None
                if owner is not None and owner.stage == stage and preferred not in idle:
                    waiting.append(job)
                    continue
                identity = preferred if owner is not None and owner.stage == stage else idle[0]
                idle.remove(identity)
                worker = self.workers[identity]
                worker.job = job
                worker.expiry = time.monotonic() + self.busy_timeout
                job.attempts += 1
                self._send_worker(identity, REQUEST, job.id.encode(), *job.frames)
            queue.extendleft(reversed(waiting))

    def _heartbeat(self) -> None:
        now = time.monotonic()
        for w in list(self.workers.values()):
            if w.expiry < now:
                print(f"egx serve: worker {w.pid} missed its heartbeats", file=self.log)
                self._remove(w, "stopped answering")
                if self.on_dead is not None:
                    self.on_dead(w.pid)
        if now >= self.next_heartbeat:
            for stage_idle in self.idle.values():
                for identity in stage_idle:
                    self._send_worker(identity, HEARTBEAT)
            self.next_heartbeat = now + HEARTBEAT_INTERVAL

    # -- shutdown -------------------------------------------------------------------
    def drain(self, grace_s: float) -> None:
        """Stop accepting; fail queued requests; give running ones ``grace_s`` to finish,
        then fail them; tell the workers to stop."""
        self.accepting = False
        first = self.queues[self.stages[0]]
        while first:
            self.fail(first.popleft(), ErrorCode.SHUTTING_DOWN, "the server is shutting down; retry on another")
        deadline = time.monotonic() + grace_s
        while self.inflight and time.monotonic() < deadline:
            self.poll_once(0.05)
        for job in list(self.inflight.values()):
            self.fail(job, ErrorCode.SHUTTING_DOWN, f"the server shut down before this request finished "
                                                    f"(grace {grace_s:g} s); send it again")
        for identity in list(self.workers):
            self._send_worker(identity, DISCONNECT)
