"""The broker: clients on a ROUTER (``--bind``), workers on a private ROUTER, requests
queued per stage with a bound, heartbeats, retries of requests whose worker died, and
replies cached by request id so that a client's retry is never executed twice.

It routes; it does not read what it carries: of a request it checks the envelope (frame
count, total size, protocol, command, service) and reads the routing fields (``id``,
``session``, ``image.id``); the worker checks the rest. Request ids, cached replies and
image affinity are scoped to the client (``client_scope``): another client cannot name them.

Single-threaded: ``poll_once`` does one round of I/O; the server calls it in a loop. No
message stops it: a failure while handling one is logged and answered.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import sys
import time
import traceback
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Callable

import zmq

from .protocol import (BUSY_TIMEOUT, DEFAULT_MAX_QUEUE, DEFAULT_MAX_REQUEST_BYTES, DISCONNECT, FINAL, HEARTBEAT,
                       HEARTBEAT_INTERVAL, HEARTBEAT_LIVENESS, MAX_FRAMES, MAX_HEADER_BYTES, MAX_SLOTS, PARTIAL,
                       PROTOCOL, PROTOCOL_FAMILY, READY, REQUEST, SERVICE, WORKER_PROTOCOL, ErrorCode, ProtocolError,
                       error_header, parse_message)
from .schema import routing

MAX_ATTEMPTS = 2  # a request whose worker died is run once more, on another worker
DONE_CACHE = 2048  # final replies kept for clients that retry (and image ids remembered)
DONE_CACHE_BYTES = 64 * 2**20


def client_scope(routing_id: bytes, user_id: str | None, session: str | None) -> str:
    """The name under which a client's request ids and images live (32 hex characters):
    its CURVE public key (``user_id``, ZAP's User-Id) when CURVE is on; else its
    ``session`` secret when it sent one (so that a fresh socket reaches the same requests);
    else its connection (the ROUTER's routing id)."""
    if user_id:
        principal = b"curve:" + user_id.encode()
    elif session:
        principal = b"session:" + session.encode()
    else:
        principal = b"connection:" + routing_id
    return hashlib.sha256(principal).hexdigest()[:32]


def _user_id(part: zmq.Frame) -> str | None:
    try:
        return part.get("User-Id") or None
    except zmq.ZMQError:  # no ZAP handler: no user id
        return None


@dataclass
class Job:
    """One accepted request. ``frames``: ``[header JSON, *buffers]`` for the current stage;
    ``scope``: the client's (``client_scope``); ``number``: the broker's name for it with
    the workers; ``client``: the routing id its replies go to (its latest socket)."""

    id: str
    scope: str
    number: int
    client: bytes
    frames: list
    stage: int = 0
    attempts: int = 0
    streamed: bool = False
    image_id: str | None = None
    accepted: float = field(default_factory=time.monotonic)


@dataclass
class Worker:
    """A registered worker: ``slots`` requests it takes at once (it batches their decoding),
    ``jobs`` those it runs now (job number -> job)."""

    identity: bytes
    stage: str
    pid: int
    expiry: float
    slots: int = 1
    jobs: dict[bytes, Job] = field(default_factory=dict)


class Broker:
    """``stages``: the worker stages a request passes through in order (``("all",)``, or
    ``("vision", "language")`` in staged mode). ``max_queue``: queued requests per stage
    beyond which clients get a ``busy`` reply. ``on_dead(pid)``: called for a worker
    declared dead by heartbeat (the server kills and replaces it)."""

    def __init__(self, frontend: zmq.Socket, backend: zmq.Socket, stages: tuple[str, ...] = ("all",),
                 max_queue: int = DEFAULT_MAX_QUEUE, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
                 busy_timeout: float = BUSY_TIMEOUT,
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
        self.idle: dict[str, list[bytes]] = {s: [] for s in stages}  # a worker once per free slot
        self.inflight: dict[tuple[str, str], Job] = {}  # (scope, request id) -> job
        self.done: OrderedDict[tuple[str, str], list] = OrderedDict()  # (scope, request id) -> final frames
        self.done_bytes = 0
        self.affinity: OrderedDict[tuple[str, str], bytes] = OrderedDict()  # (scope, image id) -> its worker
        self.numbers = itertools.count(1)
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
                self._guarded(self._on_worker, parts)
        if events.get(self.frontend) == zmq.POLLIN:
            for _ in range(1000):
                try:
                    parts = self.frontend.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                self._guarded(self._on_client, parts)
        self._guarded(self._dispatch)
        self._guarded(self._heartbeat)

    def _guarded(self, step: Callable, *args) -> None:
        """Run one step of the loop; an unexpected failure is logged, never fatal (the
        client handlers answer their own)."""
        try:
            step(*args)
        except Exception:  # the broker's boundary: logged with its traceback, the loop goes on
            print(f"egx serve: unexpected failure in {step.__name__} (the server keeps serving):", file=self.log)
            traceback.print_exc(file=self.log)

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
            route = self._envelope(frames)
            request_id = route.id
            scope = client_scope(client, _user_id(parts[-1]), route.session)
            job = self._admit(client, scope, route, frames)
        except ProtocolError as exc:
            self._error(client, request_id or exc.request_id, exc.code, exc.message)
            return
        except Exception as exc:  # a bug, not the client's fault: logged, answered, the broker goes on
            print("egx serve: unexpected failure on a client message (answered 'internal'):", file=self.log)
            traceback.print_exc(file=self.log)
            self._error(client, request_id, ErrorCode.INTERNAL, f"the server failed on this request "
                                                                f"({type(exc).__name__}); it logged why")
            return
        if job is not None:
            self.queues[self.stages[0]].append(job)

    def _envelope(self, frames: list):
        """Check the frames around the header, the total size first; returns the header's
        routing fields (``schema.Routing``)."""
        if len(frames) > MAX_FRAMES:
            raise ProtocolError(ErrorCode.MALFORMED, f"{len(frames)} frames; at most {MAX_FRAMES}")
        size = sum(memoryview(f).nbytes for f in frames)
        if size > self.max_request_bytes:
            raise ProtocolError(ErrorCode.TOO_LARGE, f"request is {size} bytes; this server takes at most "
                                                     f"{self.max_request_bytes} (serve --max-request-mb)",
                                self._readable_id(frames))
        if len(frames) < 5 or len(frames[0]) != 0:
            raise ProtocolError(ErrorCode.MALFORMED, "expected frames [empty, protocol, command, service, header, "
                                                     "*buffers] (docs/protocol.md)")
        protocol = bytes(frames[1][:16])
        if protocol != PROTOCOL:
            if protocol.startswith(PROTOCOL_FAMILY):
                raise ProtocolError(ErrorCode.BAD_VERSION, f"this server speaks {PROTOCOL.decode()}, "
                                                           f"the request is {protocol!r}")
            raise ProtocolError(ErrorCode.MALFORMED, f"unknown protocol {protocol!r}; expected {PROTOCOL!r}")
        if bytes(frames[2][:4]) != REQUEST:
            raise ProtocolError(ErrorCode.MALFORMED, f"unknown command {bytes(frames[2][:4])!r}; clients send REQUEST")
        route = routing(frames[4])
        if bytes(frames[3][:32]) != SERVICE:
            raise ProtocolError(ErrorCode.UNKNOWN_SERVICE, f"no service {bytes(frames[3][:32])!r} here; "
                                                           f"use {SERVICE.decode()!r}", route.id)
        return route

    @staticmethod
    def _readable_id(frames: list) -> str | None:
        """The request id of an oversized request, when its header frame is in place and readable."""
        if len(frames) < 5 or memoryview(frames[4]).nbytes > MAX_HEADER_BYTES:
            return None
        try:
            return routing(frames[4]).id
        except ProtocolError:
            return None

    def _admit(self, client: bytes, scope: str, route, frames: list) -> Job | None:
        """A new job, or None when the request needs no new work (a client's retry);
        raises ProtocolError for an error reply."""
        key = (scope, route.id)
        if key in self.done:  # a retry of an answered request: the same answer again
            self.done.move_to_end(key)
            self._reply(client, FINAL, self.done[key])
            return None
        if key in self.inflight:  # a retry of a running request: answer the new socket
            self.inflight[key].client = client
            return None
        if not self.accepting:
            raise ProtocolError(ErrorCode.SHUTTING_DOWN, "the server is shutting down; try another or retry later")
        if (len(self.queues[self.stages[0]]) >= self.max_queue
                or len(self.inflight) >= self.max_queue + len(self.workers)):
            raise ProtocolError(ErrorCode.BUSY, f"{self.max_queue} requests are queued; retry later")
        job = Job(route.id, scope, next(self.numbers), client, list(frames[4:]), image_id=route.image_id)
        self.inflight[key] = job
        return job

    def _finish(self, job: Job, frames: list) -> None:
        """The one final reply of ``job``."""
        key = (job.scope, job.id)
        self.inflight.pop(key, None)
        frames = [bytes(f) for f in frames]  # kept: own the bytes, not a view of a received message
        self.done[key] = frames
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
        elif command == HEARTBEAT:  # (a worker that batches beats between steps: still allowed its busy timeout)
            beat = time.monotonic() + HEARTBEAT_INTERVAL * HEARTBEAT_LIVENESS
            worker.expiry = max(worker.expiry, beat) if worker.jobs else beat
        elif command in (PARTIAL, FINAL) and len(frames) >= 5:
            self._on_result(worker, command, frames[3], frames[4:])

    def _on_ready(self, identity: bytes, frames: list) -> None:
        info = json.loads(bytes(frames[4])) if len(frames) > 4 else {}
        stage = bytes(frames[3]).decode(errors="replace")
        if stage not in self.stages:
            self._send_worker(identity, DISCONNECT)
            return
        old = self.workers.get(identity)
        if old is not None:
            self._remove(old, "re-registered")
        slots = info.get("slots", 1)
        slots = min(max(slots, 1), MAX_SLOTS) if isinstance(slots, int) else 1
        self.workers[identity] = Worker(identity, stage, int(info.get("pid", 0)),
                                        time.monotonic() + HEARTBEAT_INTERVAL * HEARTBEAT_LIVENESS, slots)
        self.idle[stage] += [identity] * slots

    def _on_result(self, worker: Worker, command: bytes, number: bytes, frames: list) -> None:
        job = worker.jobs.get(bytes(number))
        worker.expiry = time.monotonic() + self.busy_timeout
        if job is None:
            return  # a late reply for a request already failed over; the retry answers it
        header = json.loads(bytes(frames[0]))
        header["id"] = job.id
        out = [json.dumps(header, separators=(",", ":")).encode(), *frames[1:]]
        if command == PARTIAL:
            job.streamed = True
            self._reply(job.client, PARTIAL, out)
            return
        del worker.jobs[bytes(number)]
        if not worker.jobs:
            worker.expiry = time.monotonic() + HEARTBEAT_INTERVAL * HEARTBEAT_LIVENESS
        self.idle[worker.stage].append(worker.identity)
        result = header.get("result") if isinstance(header.get("result"), dict) else {}
        image_id = header.get("image_id") or result.get("image_id")
        if isinstance(image_id, str) and worker.stage == self.stages[0]:  # the stage that caches encodings
            self.affinity[(job.scope, image_id)] = worker.identity
            self.affinity.move_to_end((job.scope, image_id))
            while len(self.affinity) > DONE_CACHE:
                self.affinity.popitem(last=False)
        if header.get("event") == "encoded" and job.stage + 1 < len(self.stages):
            try:
                self._hand_on(job, header, frames)
            except (ProtocolError, ValueError, TypeError, KeyError) as exc:
                self.fail(job, ErrorCode.INTERNAL, f"the vision stage's encoding could not be handed on: {exc}")
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
        self.idle[worker.stage] = [i for i in self.idle[worker.stage] if i != worker.identity]
        jobs, worker.jobs = list(worker.jobs.values()), {}
        for job in reversed(jobs):
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
                if (job.scope, job.id) not in self.inflight:
                    continue
                preferred = self.affinity.get((job.scope, job.image_id)) if job.image_id else None
                owner = self.workers.get(preferred) if preferred else None
                if owner is not None and owner.stage == stage and preferred not in idle:
                    waiting.append(job)
                    continue
                identity = preferred if owner is not None and owner.stage == stage else idle[0]
                idle.remove(identity)
                worker = self.workers[identity]
                worker.jobs[str(job.number).encode()] = job
                worker.expiry = time.monotonic() + self.busy_timeout
                job.attempts += 1
                self._send_worker(identity, REQUEST, str(job.number).encode(), job.scope.encode(), *job.frames)
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
                for identity in dict.fromkeys(stage_idle):
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

