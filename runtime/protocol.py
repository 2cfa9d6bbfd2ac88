"""The wire protocol's constants and its encoding, in one place (docs/protocol.md is the
specification; this module is the reference implementation of it).

Client <-> broker (Majordomo-like, several replies per request)::

    client -> broker: [b"", PROTOCOL, REQUEST, service, header JSON, *buffers]
    broker -> client: [b"", PROTOCOL, PARTIAL | FINAL, service, header JSON, *buffers]

Broker <-> worker (a private ``ipc://`` endpoint; same header, the client's address
travels as a frame)::

    worker -> broker: [b"", WORKER_PROTOCOL, READY, service, info JSON]  (info: pid, device, slots)
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
import math
from dataclasses import dataclass, field
from typing import Annotated, Literal

import numpy as np
import pydantic_core
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from earthgptx.tasks import TASKS as MODEL_TASKS  # what the model answers

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
MAX_SLOTS = 64  # requests one worker may take at once (it says how many in its READY info)

# limits (docs/protocol.md, "Limits", and the memory they bound)
MAX_HEADER_BYTES = 64 * 1024
MAX_FRAMES = 16  # of a client's message, delimiter included
MAX_ID_CHARS = 64  # a request id; also the longest session
MIN_SESSION_CHARS = 32  # a session secret (e.g. uuid4().hex): long enough not to be guessed
MAX_NAME_CHARS = 64  # a buffer's name
MAX_DIMS = 4
MAX_DIM = 2**31 - 1  # one dimension of a buffer
DEFAULT_MAX_REQUEST_BYTES = 256 * 2**20
DEFAULT_MAX_QUEUE = 32  # queued requests per stage before clients get ``busy``
DTYPES = ("|u1", "|b1", "<u2", "<i2", "<u4", "<i4", "<f4", "<f8", "<c8")
MAX_TEXT_CHARS = 4096  # header["text"], checked by the schema
MAX_TEXT_TOKENS = 512  # header["text"] after tokenisation, checked before the model runs
MAX_IMAGE_PIXELS = 2**24  # H * W of the "image" buffer (e.g. 4096 x 4096)
MAX_PROMPTS = 64  # points + boxes in a header (the model takes fewer: its max_regions)
MAX_NEW_TOKENS = 1024
MAX_STOP_STRINGS = 8
MAX_STOP_CHARS = 64
MAX_SEED = 2**64 - 1
MAX_OPTION_CHARS = 32  # a preprocess option's string value
MAX_FRAME_FACTOR = 2  # ZeroMQ's MAXMSGSIZE (one frame) is this times the request limit
FRONTEND_RCVHWM = 16  # whole messages ZeroMQ queues per client connection before it stops reading it
FRONTEND_SNDHWM = 1000  # replies queued per client connection (streamed tokens)

# tasks: the predictor's, plus two the runtime answers itself
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
    """A request the server refuses; becomes an error reply (with ``request_id`` when known)."""

    def __init__(self, code: str, message: str, request_id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id


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


class StrictModel(BaseModel):
    """Schemas of the wire: exact JSON types (no ``true`` for 1, no ``"9"`` for 9), finite
    numbers only, unknown fields refused."""

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False, frozen=True)


RequestId = Annotated[str, Field(min_length=1, max_length=MAX_ID_CHARS)]


class BufferSpec(StrictModel):
    """One entry of ``header["buffers"]``: the next frame is ``prod(shape) * itemsize``
    bytes of ``dtype`` (numpy ``dtype.str``), C order; at most ``MAX_DIMS`` dimensions of
    ``0..MAX_DIM`` each."""

    name: Annotated[str, Field(min_length=1, max_length=MAX_NAME_CHARS)]
    dtype: Literal[DTYPES]
    shape: Annotated[list[Annotated[int, Field(ge=0, le=MAX_DIM)]], Field(max_length=MAX_DIMS)]


BufferSpecs = Annotated[list[BufferSpec], Field(max_length=MAX_FRAMES)]
_SPECS = TypeAdapter(BufferSpecs)


def explain(exc: ValidationError, limit: int = 3) -> str:
    """A schema failure in one line: ``field.path: what is wrong`` (the input is not echoed)."""
    parts = []
    for err in exc.errors(include_url=False, include_input=False)[:limit]:
        where = ".".join(str(p) for p in err["loc"]) or "header"
        parts.append(f"{where}: {err['msg']}")
    more = exc.error_count() - limit
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


def schema_error_code(errors: list[dict]) -> str:
    """The error code of a header that failed its schema: ``malformed`` for unreadable JSON,
    not an object, a bad ``id``, or a ``buffers`` list of the wrong structure; ``bad_request``
    for a buffer's wrong ``dtype``/``shape`` or any other field; ``unknown_task`` for ``task``."""
    def structural(err: dict) -> bool:
        loc = err["loc"]
        if err["type"] == "json_invalid" or not loc:  # unreadable, or not an object
            return True
        if loc[0] == "id":
            return True
        return loc[0] == "buffers" and not (len(loc) > 2 and loc[2] in ("dtype", "shape"))

    if any(structural(err) for err in errors):
        return ErrorCode.MALFORMED
    if any(err["loc"][0] == "task" for err in errors):
        return ErrorCode.UNKNOWN_TASK
    return ErrorCode.BAD_REQUEST


def parse_header(frame) -> dict:
    """A header frame -> its JSON object. The parser (pydantic-core's) refuses nesting over
    200 levels, integers over 4,300 digits, lone surrogates, NaN and Infinity; the frame
    must be at most ``MAX_HEADER_BYTES``. Raises ``ProtocolError`` (``too_large``/``malformed``)."""
    data = bytes(frame)
    if len(data) > MAX_HEADER_BYTES:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"header is {len(data)} bytes; the limit is {MAX_HEADER_BYTES}")
    try:
        header = pydantic_core.from_json(data, allow_inf_nan=False)
    except ValueError as exc:
        raise ProtocolError(ErrorCode.MALFORMED, f"header is not UTF-8 JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError(ErrorCode.MALFORMED, "header must be a JSON object")
    return header


def parse_message(frames: list) -> Message:
    """``[header JSON, *buffers]`` -> a Message whose tensors are zero-copy views of the frames."""
    if not frames:
        raise ProtocolError(ErrorCode.MALFORMED, "missing header frame")
    header = parse_header(frames[0])
    try:
        specs = _SPECS.validate_python(header.pop("buffers", []))
    except ValidationError as exc:
        errors = [dict(err, loc=("buffers", *err["loc"])) for err in exc.errors()]
        raise ProtocolError(schema_error_code(errors), f"'buffers': {explain(exc)} (docs/protocol.md, Tensors)"
                            ) from None
    return Message(header, tensors(specs, frames[1:]))


def tensors(specs: list[BufferSpec], frames: list) -> dict[str, np.ndarray]:
    """Buffer frames described by ``specs`` -> name -> a read-only view (no copy).
    Raises ``ProtocolError``: ``malformed`` for a count or name mismatch, ``bad_request``
    for a byte count that does not match dtype and shape."""
    if len(specs) != len(frames):
        raise ProtocolError(ErrorCode.MALFORMED, f"header lists {len(specs)} buffers but {len(frames)} buffer "
                                                 "frames follow")
    out = {}
    for spec, frame in zip(specs, frames):
        if spec.name in out:
            raise ProtocolError(ErrorCode.MALFORMED, f"buffer {spec.name!r} is listed twice")
        dt = np.dtype(spec.dtype)
        expected = math.prod(spec.shape) * dt.itemsize  # Python ints: no overflow
        data = memoryview(frame)
        if data.nbytes != expected:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"buffer {spec.name!r}: {data.nbytes} bytes, but dtype "
                                                       f"{spec.dtype} and shape {spec.shape} need {expected}")
        try:
            out[spec.name] = np.frombuffer(data, dtype=dt).reshape(spec.shape)
        except ValueError as exc:  # e.g. an empty buffer of shape [0, 2**31 - 1, 2**31 - 1, 2**31 - 1]
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"buffer {spec.name!r}: shape {spec.shape}: {exc}") from None
    return out


def error_header(request_id, code: str, message: str) -> dict:
    return {"id": request_id, "event": "error", "error": {"code": code, "message": message}}
