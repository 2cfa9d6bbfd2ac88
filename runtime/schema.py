"""The request header's schema (docs/protocol.md, "Request header"), as pydantic models.

Two readers, two views of the same header:

* the broker routes by ``Routing`` only (``id``, and ``image.id`` for cache affinity) and
  ignores everything else (a broker does not read what it carries);
* the worker checks the whole header against ``RequestHeader`` before any work, with the
  limits of ``runtime/protocol.py``.

Why pydantic (v2): its Rust JSON parser refuses what killed the old server (nesting
deeper than 200, integers over 4,300 digits, lone surrogates, NaN) without raising
Python's ``RecursionError``/``ValueError``; strict mode refuses ``true`` for an int and
``"9"`` for 9; constrained types state the ranges next to the fields; one validation
error lists every problem with its field path. It was already installed with the stack.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .protocol import (MAX_FRAMES, MAX_ID_CHARS, MIN_SESSION_CHARS, MAX_NEW_TOKENS, MAX_OPTION_CHARS, MAX_PROMPTS, MAX_SEED, MAX_STOP_CHARS,
                       MAX_HEADER_BYTES, MAX_STOP_STRINGS, MAX_TEXT_CHARS, TASKS, BufferSpec, ErrorCode,
                       ProtocolError, RequestId, StrictModel, explain, parse_header, schema_error_code)

Finite = float  # with allow_inf_nan=False (``StrictModel``): finite numbers, ints accepted
Option = Annotated[str, Field(max_length=MAX_OPTION_CHARS)]
Session = Annotated[str, Field(min_length=MIN_SESSION_CHARS, max_length=MAX_ID_CHARS)]


class Routing(BaseModel):
    """What the broker reads of a header: the request ``id`` (1-64 characters), the
    optional ``session`` secret (32-64 characters; names the client when CURVE is off) and,
    when present and a string, ``image.id`` (to send the request to the worker that cached
    that image). Other fields are the worker's business."""

    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False, frozen=True)

    id: RequestId
    session: Session | None = None
    image: Any = None

    @property
    def image_id(self) -> str | None:
        key = self.image.get("id") if isinstance(self.image, dict) else None
        return key if isinstance(key, str) and len(key) == 64 else None


def routing(frame) -> Routing:
    """The header frame -> ``Routing``; raises ``ProtocolError`` (``malformed``/``too_large``)."""
    header = parse_header(frame)
    try:
        return Routing.model_validate(header)
    except ValidationError as exc:
        raise ProtocolError(ErrorCode.MALFORMED, f"{explain(exc)}; the header needs 'id', a string of 1-64 "
                                                 "characters (a UUID4 is a good choice), unique per request") from None


class Preprocess(StrictModel):
    """``image.preprocess``: as ``egx predict`` (values checked by the preprocessing)."""

    sar_scaling: Option | None = None
    sar_kind: Option | None = None
    speckle_filter: bool | None = None


class ImageSpec(StrictModel):
    """``image``: ``modality``; ``id`` (64 hex characters) to name an uploaded image."""

    modality: Option
    id: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")] | None = None
    preprocess: Preprocess = Preprocess()


class Generation(StrictModel):
    """``generation``: as ``egx predict``. ``top_k`` is also checked against the model's
    vocabulary by the worker."""

    max_new_tokens: Annotated[int, Field(ge=0, le=MAX_NEW_TOKENS)] = 64
    do_sample: bool = False
    temperature: Annotated[Finite, Field(ge=0)] = 1.0
    top_k: Annotated[int, Field(ge=0, le=2**31 - 1)] = 0
    top_p: Annotated[Finite, Field(gt=0, le=1)] = 1.0
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] | None = None
    stop: Annotated[list[Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]],
                    Field(max_length=MAX_STOP_STRINGS)] = []


class Encoded(BaseModel):
    """``encoded``: what the broker adds in staged mode (the vision stage's reply header)."""

    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False, frozen=True)

    image_id: str
    modality: str
    letterbox: tuple[int, int, int]
    window: tuple[int, int, int, int] | None = None  # x0, y0, x1, y1: the zoom window encoded (processing.zoom_window)
    timings_ms: dict[str, Finite] = {}


Point = tuple[Finite, Finite]
Box = tuple[Finite, Finite, Finite, Finite]


class RequestHeader(StrictModel):
    """A client's request header, whole. ``text``: at most ``MAX_TEXT_CHARS`` characters
    (tokens are counted by the worker); ``points``/``boxes``: at most ``MAX_PROMPTS`` in
    all, original pixel frame."""

    id: RequestId
    session: Session | None = None
    task: Literal[TASKS]
    text: Annotated[str, Field(max_length=MAX_TEXT_CHARS)] = ""
    image: ImageSpec | None = None
    points: Annotated[list[Point], Field(max_length=MAX_PROMPTS)] = []
    boxes: Annotated[list[Box], Field(max_length=MAX_PROMPTS)] = []
    generation: Generation = Generation()
    stream: bool = False
    buffers: Annotated[list[BufferSpec], Field(max_length=MAX_FRAMES)] = []
    encoded: Encoded | None = None


def request_header(frame) -> RequestHeader:
    """The header frame (at most ``MAX_HEADER_BYTES``) -> ``RequestHeader``. Raises
    ``ProtocolError``: ``too_large``; ``malformed`` for JSON that is not an object or a bad
    ``id`` or ``buffers``; ``unknown_task`` for a bad ``task``; ``bad_request`` for anything
    else (the message names the fields)."""
    data = bytes(frame)
    if len(data) > MAX_HEADER_BYTES:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"header is {len(data)} bytes; the limit is {MAX_HEADER_BYTES}")
    try:
        out = RequestHeader.model_validate_json(data)
    except ValidationError as exc:
        code = schema_error_code(exc.errors())
        hint = f"; tasks: {', '.join(TASKS)}" if code == ErrorCode.UNKNOWN_TASK else " (docs/protocol.md)"
        raise ProtocolError(code, explain(exc) + hint) from None
    if len(out.points) + len(out.boxes) > MAX_PROMPTS:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"{len(out.points) + len(out.boxes)} points and boxes; "
                                                   f"at most {MAX_PROMPTS}")
    return out
