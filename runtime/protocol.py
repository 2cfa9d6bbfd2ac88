"""The wire protocol's constants and its encoding, in one place (docs/protocol.md is the
specification; this module is the reference implementation of it).

Client <-> broker (Majordomo-like, several replies per request)::

    client -> broker: [b"", PROTOCOL, REQUEST, service, header JSON, *buffers]
    broker -> client: [b"", PROTOCOL, PARTIAL | FINAL, service, header JSON, *buffers]

Broker <-> worker (a private ``ipc://`` endpoint; same header, the client's address
travels as a frame)::

    worker -> broker: [b"", WORKER_PROTOCOL, READY, service, info JSON]
                      [b"", WORKER_PROTOCOL, PARTIAL | FINAL, job id, header JSON, *buffers]
                      [b"", WORKER_PROTOCOL, HEARTBEAT] / [..., DISCONNECT]
    broker -> worker: [b"", WORKER_PROTOCOL, REQUEST, job id, header JSON, *buffers]
                      [b"", WORKER_PROTOCOL, HEARTBEAT] / [..., DISCONNECT]

Buffers are raw C-order bytes described by ``header["buffers"]``: a list of
``{"name", "dtype", "shape"}`` in frame order (dtype as numpy's ``dtype.str``, e.g.
``"|u1"``, ``"<u2"``, ``"<f4"``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

PROTOCOL = b"EGX/1"
PROTOCOL_FAMILY = b"EGX/"
WORKER_PROTOCOL = b"EGXW/1"
VERSION = 1
SERVICE = b"earthgptx"

# commands (one byte)
REQUEST = b"\x01"
PARTIAL = b"\x02"
FINAL = b"\x03"
READY = b"\x04"
HEARTBEAT = b"\x05"
DISCONNECT = b"\x06"

# timing (seconds)
HEARTBEAT_INTERVAL = 1.0
HEARTBEAT_LIVENESS = 3  # missed idle heartbeats before a worker is declared dead
BUSY_TIMEOUT = 120.0  # silence from a worker on a request before it is declared dead

# limits
MAX_HEADER_BYTES = 64 * 1024
MAX_FRAMES = 16
MAX_ID_CHARS = 64
DEFAULT_MAX_REQUEST_BYTES = 256 * 2**20
DTYPES = ("|u1", "|b1", "<u2", "<i2", "<u4", "<i4", "<f4", "<f8", "<c8")

# tasks: the predictor's, plus two the runtime answers itself
MODEL_TASKS = ("auto", "caption", "classify", "vqa", "region", "grounding", "segment", "click")
TASKS = MODEL_TASKS + ("upload", "ping")


class ErrorCode:
    """``header["error"]["code"]`` of an ``event: "error"`` reply."""

    MALFORMED = "malformed"  # frames or header JSON unreadable
    BAD_VERSION = "bad_version"  # another protocol version
    TOO_LARGE = "too_large"  # request over the server's size limit
    UNKNOWN_SERVICE = "unknown_service"
    UNKNOWN_TASK = "unknown_task"
    BAD_REQUEST = "bad_request"  # bad image, dtype/shape, modality, prompt outside the image
    IMAGE_UNKNOWN = "image_unknown"  # image_id not cached: send the image again
    BUSY = "busy"  # queue full: retry later
    WORKER_LOST = "worker_lost"  # the worker died and the request could not be retried
    SHUTTING_DOWN = "shutting_down"
    INTERNAL = "internal"  # a server-side failure; the message says which


class ProtocolError(Exception):
    """A request the server refuses; becomes an error reply."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class Message:
    """One request or reply: a JSON header and named tensors."""

    header: dict
    tensors: dict[str, np.ndarray] = field(default_factory=dict)

    def frames(self) -> list:
        """``[header JSON, *buffers]``; tensors are sent without a copy."""
        specs, bufs = [], []
        for name, arr in self.tensors.items():
            arr = np.ascontiguousarray(arr)
            specs.append({"name": name, "dtype": arr.dtype.str, "shape": list(arr.shape)})
            bufs.append(memoryview(arr.view(np.uint8).reshape(-1)) if arr.size else b"")
        header = dict(self.header, buffers=specs) if specs else self.header
        return [json.dumps(header, separators=(",", ":")).encode(), *bufs]


def parse_header(frame: bytes) -> dict:
    if len(frame) > MAX_HEADER_BYTES:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"header is {len(frame)} bytes; the limit is {MAX_HEADER_BYTES}")
    try:
        header = json.loads(bytes(frame).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(ErrorCode.MALFORMED, f"header is not UTF-8 JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError(ErrorCode.MALFORMED, "header must be a JSON object")
    return header


def parse_message(frames: list) -> Message:
    """``[header JSON, *buffers]`` -> a Message whose tensors are zero-copy views of the frames."""
    if not frames:
        raise ProtocolError(ErrorCode.MALFORMED, "missing header frame")
    header = parse_header(frames[0])
    specs = header.pop("buffers", [])
    if not isinstance(specs, list) or len(specs) != len(frames) - 1:
        raise ProtocolError(ErrorCode.MALFORMED, f"header lists {len(specs) if isinstance(specs, list) else '?'} "
                                                 f"buffers but {len(frames) - 1} buffer frames follow")
    tensors = {}
    for spec, frame in zip(specs, frames[1:]):
        tensors[_name(spec)] = _tensor(spec, frame)
    return Message(header, tensors)


def _name(spec) -> str:
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise ProtocolError(ErrorCode.MALFORMED, f"buffer spec {spec!r} needs a string 'name'")
    return spec["name"]


def _tensor(spec: dict, frame) -> np.ndarray:
    name, dtype, shape = spec["name"], spec.get("dtype"), spec.get("shape")
    if dtype not in DTYPES:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"buffer {name!r}: dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape) or len(shape) > 4:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"buffer {name!r}: shape must be a list of <= 4 non-negative ints")
    dt = np.dtype(dtype)
    expected = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
    data = memoryview(frame)
    if data.nbytes != expected:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"buffer {name!r}: {data.nbytes} bytes, but dtype {dtype} "
                                                   f"and shape {shape} need {expected}")
    return np.frombuffer(data, dtype=dt).reshape(shape)


def error_header(request_id, code: str, message: str) -> dict:
    return {"id": request_id, "event": "error", "error": {"code": code, "message": message}}


def check_request_id(header: dict) -> str:
    rid = header.get("id")
    if not isinstance(rid, str) or not 0 < len(rid) <= MAX_ID_CHARS:
        raise ProtocolError(ErrorCode.MALFORMED, f"header 'id' must be a string of 1-{MAX_ID_CHARS} characters "
                                                 "(a UUID4 is a good choice), unique per request")
    return rid
