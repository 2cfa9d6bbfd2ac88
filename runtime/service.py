"""What a worker does with one request: protocol ``Message`` in, replies out, through the
``Predictor`` (the same chain as ``egx predict``). Three stages:

* ``all``: the whole chain in one process;
* ``vision``: preprocess + ``vision_encoder`` (cached); hands the encoding on;
* ``language``: ``prompt_encoder`` -> ``llm`` -> ``pixel_decoder`` on a handed-on encoding.
"""
from __future__ import annotations

import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from earthgptx import vision_encoder
from earthgptx.errors import InputError
from earthgptx.generation import GenerationConfig
from earthgptx.image_cache import encoding_key, image_id
from earthgptx.predictor import EncodedImage, PendingAnswer
from earthgptx.processing import Letterbox, VisualPrompts, check_modality

from .protocol import (MAX_IMAGE_PIXELS, MAX_TEXT_TOKENS, MODEL_TASKS, ErrorCode, Message, ProtocolError,
                       error_header, tensors)
from .schema import RequestHeader, request_header

STAGES = ("all", "vision", "language")
ENCODING_TENSORS = vision_encoder.OUTPUT_NAMES  # what the vision stage hands on

Emit = Callable[[Message, bool], None]  # (reply, final)


@dataclass
class Request:
    """A request as a worker takes it: the checked header, its tensors (name -> read-only
    view of a frame) and ``scope``, the broker's opaque name of the client (hex; cached
    images are the client's own: another client cannot name them)."""

    header: RequestHeader
    tensors: dict[str, np.ndarray] = field(default_factory=dict)
    scope: str = ""


def parse_request(frames: list, scope: str = "") -> Request:
    """``[header JSON, *buffers]`` -> a checked ``Request``; raises ``ProtocolError``."""
    if not frames:
        raise ProtocolError(ErrorCode.MALFORMED, "missing header frame")
    header = request_header(frames[0])
    return Request(header, tensors(header.buffers, frames[1:]), scope)


def _bad(message: str) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_REQUEST, message)


def generation_config(header: RequestHeader, vocab: int) -> GenerationConfig:
    """``header.generation`` (ranges checked by the schema) -> a ``GenerationConfig``;
    ``top_k`` must not exceed the model's vocabulary."""
    g = header.generation
    if g.top_k > vocab:
        raise _bad(f"generation.top_k is {g.top_k}; this model has {vocab} tokens (0 turns top-k off)")
    return GenerationConfig(max_new_tokens=g.max_new_tokens, do_sample=g.do_sample, temperature=g.temperature,
                            top_k=g.top_k, top_p=g.top_p, seed=g.seed, stop_strings=tuple(g.stop))


def visual_prompts(req: Request) -> VisualPrompts:
    """Points ``[[x, y]]`` and boxes ``[[x0, y0, x1, y1]]`` (original pixel frame) from the
    header; free-forms from tensors ``scribble.0``, ``scribble.1``... (``(H, W)``, non-zero = drawn)."""
    n = sum(1 for k in req.tensors if k.startswith("scribble."))
    scribbles = []
    for i in range(n):
        m = req.tensors.get(f"scribble.{i}")
        if m is None or m.ndim != 2:
            raise _bad(f"scribbles must be named scribble.0 .. scribble.{n - 1}, each (H, W)")
        scribbles.append(m != 0)
    return VisualPrompts(list(req.header.points), list(req.header.boxes), scribbles)


def image_spec(header: RequestHeader) -> tuple[str | None, str, dict]:
    """``header.image`` -> (image id or None, modality, preprocess options given)."""
    spec = header.image
    if spec is None:
        raise _bad("'image' must be an object with 'modality' (and 'id' to reuse an uploaded image)")
    try:
        modality = check_modality(spec.modality)
    except InputError as exc:
        raise _bad(str(exc)) from None
    return spec.id, modality, spec.preprocess.model_dump(exclude_none=True)


def _check_buffers(req: Request, stage: str) -> None:
    """Only the buffers a model task takes: ``image``, ``scribble.K`` (and, handed on by the
    broker to the language stage, the encoding)."""
    allowed = ("image",) + (ENCODING_TENSORS if stage == "language" else ())
    for name in req.tensors:
        if name not in allowed and not (name.startswith("scribble.") and name[9:].isdigit()):
            raise _bad(f"unknown buffer {name!r}; a request carries 'image' and 'scribble.0', 'scribble.1', ...")
    if (req.header.encoded is not None) != (stage == "language"):
        raise _bad("'encoded' is not a request field (the server adds it between its stages)")
    image = req.tensors.get("image")
    if image is not None:
        if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] > 4):
            raise _bad(f"'image' must be (H, W) or (H, W, C<=4), got shape {list(image.shape)}")
        if image.shape[0] * image.shape[1] > MAX_IMAGE_PIXELS:
            raise ProtocolError(ErrorCode.TOO_LARGE, f"image of {image.shape[0]} x {image.shape[1]} pixels; this "
                                                     f"server takes at most {MAX_IMAGE_PIXELS} (downsample or tile it)")


@dataclass
class Started:
    """A model request whose LLM decoding is to be driven: ``pending`` (``Predictor.begin``),
    the image id its result names, and the request's ``emit``."""

    pending: PendingAnswer
    image_id: str
    emit: Emit

    def complete(self, generated, decode_batch: int | None = None) -> None:
        """The final reply from the decoding's ``Generated`` (``None`` when there was none);
        ``decode_batch``: the most requests its decode steps ran with (a batching worker's)."""
        out = self.pending.finish(generated).to_json()
        out["image_id"] = self.image_id
        if decode_batch is not None:
            out["decode_batch"] = decode_batch
        self.emit(Message({"event": "result", "result": out}), True)


class RequestHandler:
    """Answers requests for one ``stage`` with ``predictor``; ``emit(reply, final)`` sends."""

    def __init__(self, predictor, stage: str = "all") -> None:
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; use one of {STAGES}")
        self.predictor = predictor
        self.stage = stage

    def handle(self, req: Request, emit: Emit) -> None:
        """Answer ``req``: zero or more partial replies, then exactly one final one.
        Raises ``ProtocolError`` for a request it refuses (the caller replies with it)."""
        started = self.start(req, emit)
        if started is not None:
            steps = started.pending.steps
            started.complete(None if steps is None else self.predictor.run_steps(steps))

    def start(self, req: Request, emit: Emit) -> "Started | None":
        """``handle`` up to the LLM's decoding: ``None`` when ``req`` is answered already (ping,
        upload, the vision stage, a refusal raised as ``ProtocolError``), else the ``Started``
        answer whose ``pending.steps`` the caller drives (alone, or batched with other
        requests' in a ``generation.DecodeBatch``) and then ``complete``s."""
        task = req.header.task
        try:
            if task == "ping":
                size = sum(t.nbytes for t in req.tensors.values())
                emit(Message({"event": "pong", "received_bytes": size, "stage": self.stage,
                              "image_size": self.predictor.config.vision.image_size}), True)
                return None
            _check_buffers(req, self.stage)
            if task == "upload" or self.stage == "vision":
                self._encode(req, emit, upload=task == "upload")
                return None
            return self._answer(req, emit)
        except InputError as exc:
            raise _bad(str(exc)) from None

    # -- stages ---------------------------------------------------------------------
    def _encoding(self, req: Request, prompts: VisualPrompts | None = None) -> tuple[EncodedImage, dict, str]:
        """(encoding, timings, the image's public id). Cached per client scope. With
        ``prompts`` on an image larger than its modality's zoom window, the encoding of the
        window around them (``Predictor.zoom_window``), as ``Predictor.predict`` zooms: a window
        not encoded yet needs the image's pixels, so an id-only request for one gets
        ``IMAGE_UNKNOWN`` and the client sends the image again."""
        key, modality, options = image_spec(req.header)
        image = req.tensors.get("image")
        window = self._window(req, key, modality, options, image, prompts)
        if window is not None:
            options = dict(options, window=window)
        if image is None:
            if key is None:
                raise _bad("send the image as a buffer named 'image', or 'image.id' of an uploaded one")
            enc = self.predictor.cached(self._scoped(req, key), modality, **options)
            if enc is None:
                zoomed = "" if window is None else f" in the window {list(window)} around the prompts"
                raise ProtocolError(ErrorCode.IMAGE_UNKNOWN, f"image {key[:12]}... is not cached here{zoomed}; "
                                                             "send it again with the request")
            return enc, {"preprocess": 0.0, "vision_encoder": 0.0}, key
        actual = image_id(image)
        if key is not None and key != actual:
            raise _bad(f"'image.id' {key[:12]}... does not match the image sent ({actual[:12]}...)")
        start = time.perf_counter()
        enc, vision_ms = self.predictor.encode_image(image, modality, self._scoped(req, actual), **options)
        timings = {"preprocess": (time.perf_counter() - start) * 1e3 - vision_ms, "vision_encoder": vision_ms}
        return enc, timings, actual

    def _window(self, req: Request, key: str | None, modality: str, options: dict, image: np.ndarray | None,
                prompts: VisualPrompts | None) -> tuple[int, int, int, int] | None:
        """The zoom window of a request (``Predictor.predict``'s rule), from the image sent or,
        for an id-only request, the size its whole-image encoding recorded; None without prompts,
        for small images, or when neither is at hand (then the image is unknown anyway)."""
        if prompts is None or not len(prompts):
            return None
        if image is not None:
            return self.predictor.zoom_window(image.shape, prompts, modality)
        whole = self.predictor.cached(self._scoped(req, key), modality, **options) if key else None
        if whole is None:
            return None
        return self.predictor.zoom_window((whole.letterbox.orig_h, whole.letterbox.orig_w), prompts, modality)

    @staticmethod
    def _scoped(req: Request, key: str) -> str:
        return f"{req.scope}/{key}" if req.scope else key

    def _precheck(self, req: Request, task: str) -> tuple[VisualPrompts, GenerationConfig]:
        """Everything about the request that can be refused before the vision encoder (or
        the LLM) runs: prompts, generation options, and the text's length in tokens."""
        prompts = visual_prompts(req)
        generation = generation_config(req.header, int(self.predictor.embed_table.shape[0]))
        text = req.header.text
        n = len(self.predictor.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0
        if n > MAX_TEXT_TOKENS:
            raise _bad(f"'text' is {n} tokens; this server takes at most {MAX_TEXT_TOKENS}")
        self.predictor.check_request(text, prompts, task)
        image = req.tensors.get("image")
        if image is not None and min(image.shape[:2]) > 0:
            prompts.check(Letterbox(image.shape[0], image.shape[1], self.predictor.config.vision.image_size))
        return prompts, generation

    def _encode(self, req: Request, emit: Emit, upload: bool) -> None:
        prompts = None if upload else self._precheck(req, self._check_task(req.header))[0]
        enc, timings, key = self._encoding(req, prompts)
        lb = enc.letterbox
        header = {"event": "encoded", "image_id": key, "modality": enc.modality,
                  "letterbox": [lb.orig_h, lb.orig_w, lb.size], "window": list(lb.window) if lb.window else None,
                  "timings_ms": timings}
        if upload:
            emit(Message(dict(header, event="result")), True)
        else:  # to the language stage, through the broker
            emit(Message(header, {"image_tokens": enc.image_tokens, "image_embedding": enc.image_embedding}), True)

    def _answer(self, req: Request, emit: Emit) -> "Started":
        task = self._check_task(req.header)
        prompts, generation = self._precheck(req, task)
        enc, timings, key = self._handed_on(req) if self.stage == "language" else self._encoding(req, prompts)
        seq = [0]

        def on_text(piece: str) -> None:
            seq[0] += 1
            emit(Message({"event": "token", "seq": seq[0], "text": piece}), False)

        pending = self.predictor.begin(enc, req.header.text, prompts, task, generation,
                                       on_text if req.header.stream else None, timings)
        return Started(pending, key, emit)

    def _handed_on(self, req: Request) -> tuple[EncodedImage, dict, str]:
        """The vision stage's encoding as the language stage gets it; its key (for the prompt
        prefix cache) names what was encoded as ``_encoding``'s does: scope, image, modality,
        pre-processing options and zoom window."""
        enc_h = req.header.encoded
        tokens, embedding = (req.tensors.get(name) for name in ENCODING_TENSORS)
        if enc_h is None or tokens is None or embedding is None:
            raise ProtocolError(ErrorCode.INTERNAL, "language stage got a request without its encoding")
        h, w, size = enc_h.letterbox
        x0, y0, x1, y1 = enc_h.window or (0, 0, 0, 0)
        lb = Letterbox(h, w, size, x0, y0, y1 - y0, x1 - x0)
        _, _, options = image_spec(req.header)
        if enc_h.window is not None:
            options = dict(options, window=tuple(enc_h.window))
        key = encoding_key(self._scoped(req, enc_h.image_id), enc_h.modality, options)
        enc = EncodedImage(lb, enc_h.modality, tokens, embedding, key)
        return enc, dict(enc_h.timings_ms), enc_h.image_id

    @staticmethod
    def _check_task(header: RequestHeader) -> str:
        if header.task not in MODEL_TASKS:
            raise ProtocolError(ErrorCode.UNKNOWN_TASK, f"task {header.task!r} is not a model task")
        return header.task


def handle_safely(handler: RequestHandler, frames: list, scope: str, emit: Emit) -> None:
    """Check ``frames`` (``[header JSON, *buffers]``) and answer them with ``handler``,
    every failure turned into one final error reply: a worker answers every request it
    takes exactly once and keeps serving. Unexpected failures are also printed with their
    traceback for the operator."""
    safely(lambda: handler.handle(parse_request(frames, scope), emit), emit)


def start_safely(handler: RequestHandler, frames: list, scope: str, emit: Emit) -> Started | None:
    """``handler.start`` on ``frames`` with ``handle_safely``'s guarantee: a failure is the
    request's one final (error) reply, and ``None`` is returned."""
    return safely(lambda: handler.start(parse_request(frames, scope), emit), emit)


def safely(work: Callable, emit: Emit):
    """``work()``'s value; a failure becomes one final error reply through ``emit`` (``None``
    is returned). ``ProtocolError``s are the client's; anything else is also logged."""
    try:
        return work()
    except ProtocolError as exc:
        emit(Message(error_header(None, exc.code, exc.message)), True)
    except Exception as exc:  # the worker's boundary: reported to the client and the log, never dropped
        traceback.print_exc(file=sys.stderr)
        emit(Message(error_header(None, ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")), True)
    return None
