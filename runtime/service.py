"""What a worker does with one request: protocol ``Message`` in, replies out, through the
``Predictor`` (the same chain as ``egx predict``). Three stages:

* ``all``: the whole chain in one process;
* ``vision``: preprocess + ``vision_encoder`` (cached); hands the encoding on;
* ``language``: ``prompt_encoder`` -> ``llm`` -> ``pixel_decoder`` on a handed-on encoding.
"""
from __future__ import annotations

import math
import sys
import time
import traceback
from typing import Callable

from earthgptx.errors import InputError
from earthgptx.generation import GenerationConfig
from earthgptx.image_cache import image_id
from earthgptx.predictor import EncodedImage
from earthgptx.processing import Letterbox, VisualPrompts, check_modality

from .protocol import MODEL_TASKS, ErrorCode, Message, ProtocolError, error_header

STAGES = ("all", "vision", "language")
PREPROCESS_OPTIONS = {"sar_scaling": str, "sar_kind": str, "speckle_filter": bool}
GENERATION_OPTIONS = {"max_new_tokens": int, "do_sample": bool, "temperature": float, "top_k": int,
                      "top_p": float, "seed": int, "stop": list}
MAX_NEW_TOKENS = 1024

Emit = Callable[[Message, bool], None]  # (reply, final)


def _bad(message: str) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_REQUEST, message)


def _typed(section: dict, name: str, kinds: dict) -> dict:
    if not isinstance(section, dict):
        raise _bad(f"'{name}' must be a JSON object")
    out = {}
    for key, value in section.items():
        kind = kinds.get(key)
        if kind is None:
            raise _bad(f"unknown '{name}' field {key!r}; known: {', '.join(kinds)}")
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if value is None and key == "seed":
            ok = True
        if not ok:
            raise _bad(f"'{name}.{key}' must be {kind.__name__}, got {value!r}")
        out[key] = value
    return out


def generation_config(header: dict) -> GenerationConfig:
    g = _typed(header.get("generation", {}), "generation", GENERATION_OPTIONS)
    stop = g.pop("stop", [])
    if not all(isinstance(s, str) for s in stop):
        raise _bad("'generation.stop' must be a list of strings")
    if g.get("max_new_tokens", 0) > MAX_NEW_TOKENS:
        raise _bad(f"max_new_tokens is at most {MAX_NEW_TOKENS} on this server")
    return GenerationConfig(**g, stop_strings=tuple(stop))


def _coords(header: dict, key: str, n: int) -> list[tuple]:
    values = header.get(key, [])
    if not isinstance(values, list):
        raise _bad(f"'{key}' must be a list")
    out = []
    for v in values:
        if (not isinstance(v, list) or len(v) != n
                or not all(isinstance(c, (int, float)) and not isinstance(c, bool) and math.isfinite(c) for c in v)):
            raise _bad(f"each of '{key}' must be a list of {n} finite numbers, got {v!r}")
        out.append(tuple(float(c) for c in v))
    return out


def visual_prompts(msg: Message) -> VisualPrompts:
    """Points ``[[x, y]]`` and boxes ``[[x0, y0, x1, y1]]`` (original pixel frame) from the
    header; free-forms from tensors ``scribble.0``, ``scribble.1``... (``(H, W)``, non-zero = drawn)."""
    n = sum(1 for k in msg.tensors if k.startswith("scribble."))
    scribbles = []
    for i in range(n):
        m = msg.tensors.get(f"scribble.{i}")
        if m is None or m.ndim != 2:
            raise _bad(f"scribbles must be named scribble.0 .. scribble.{n - 1}, each (H, W)")
        scribbles.append(m != 0)
    return VisualPrompts(_coords(msg.header, "points", 2), _coords(msg.header, "boxes", 4), scribbles)


def image_spec(header: dict) -> tuple[str | None, str, dict]:
    """``header["image"]`` -> (image id or None, modality, preprocess options)."""
    spec = header.get("image")
    if not isinstance(spec, dict):
        raise _bad("'image' must be an object with 'modality' (and 'id' to reuse an uploaded image)")
    try:
        modality = check_modality(spec.get("modality"))
    except InputError as exc:
        raise _bad(str(exc)) from None
    key = spec.get("id")
    if key is not None and (not isinstance(key, str) or len(key) != 64):
        raise _bad("'image.id' must be the 64-character hex SHA-256 image id (docs/protocol.md)")
    return key, modality, _typed(spec.get("preprocess", {}), "image.preprocess", PREPROCESS_OPTIONS)


class RequestHandler:
    """Answers requests for one ``stage`` with ``predictor``; ``emit(reply, final)`` sends."""

    def __init__(self, predictor, stage: str = "all") -> None:
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; use one of {STAGES}")
        self.predictor = predictor
        self.stage = stage

    def handle(self, msg: Message, emit: Emit) -> None:
        """Answer ``msg``: zero or more partial replies, then exactly one final one.
        Raises ``ProtocolError`` for a request it refuses (the caller replies with it)."""
        task = msg.header.get("task")
        try:
            if task == "ping":
                size = sum(t.nbytes for t in msg.tensors.values())
                emit(Message({"event": "pong", "received_bytes": size, "stage": self.stage}), True)
            elif task == "upload" or self.stage == "vision":
                self._encode(msg, emit, upload=task == "upload")
            else:
                self._answer(msg, emit)
        except InputError as exc:
            raise _bad(str(exc)) from None

    # -- stages ---------------------------------------------------------------------
    def _encoding(self, msg: Message) -> tuple[EncodedImage, dict]:
        key, modality, options = image_spec(msg.header)
        image = msg.tensors.get("image")
        if image is None:
            if key is None:
                raise _bad("send the image as a buffer named 'image', or 'image.id' of an uploaded one")
            enc = self.predictor.cached(key, modality, **options)
            if enc is None:
                raise ProtocolError(ErrorCode.IMAGE_UNKNOWN, f"image {key[:12]}... is not cached here; "
                                                             "send it again with the request")
            return enc, {"preprocess": 0.0, "vision_encoder": 0.0}
        if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] > 4):
            raise _bad(f"'image' must be (H, W) or (H, W, C<=4), got shape {list(image.shape)}")
        actual = image_id(image)
        if key is not None and key != actual:
            raise _bad(f"'image.id' {key[:12]}... does not match the image sent ({actual[:12]}...)")
        start = time.perf_counter()
        enc, vision_ms = self.predictor.encode_image(image, modality, actual, **options)
        return enc, {"preprocess": (time.perf_counter() - start) * 1e3 - vision_ms, "vision_encoder": vision_ms}

    def _precheck(self, msg: Message, task: str) -> tuple[VisualPrompts, GenerationConfig, str]:
        """Everything about the request that can be refused before the vision encoder runs."""
        prompts, generation, text = visual_prompts(msg), generation_config(msg.header), msg.header.get("text", "")
        if not isinstance(text, str):
            raise _bad("'text' must be a string")
        self.predictor.check_request(text, prompts, task)
        image = msg.tensors.get("image")
        if image is not None and image.ndim >= 2:
            prompts.check(Letterbox(image.shape[0], image.shape[1], self.predictor.config.vision.image_size))
        return prompts, generation, text

    def _encode(self, msg: Message, emit: Emit, upload: bool) -> None:
        if not upload:
            self._precheck(msg, self._check_task(msg.header))
        enc, timings = self._encoding(msg)
        lb = enc.letterbox
        header = {"event": "encoded", "image_id": enc.key.split("|", 1)[0], "modality": enc.modality,
                  "letterbox": [lb.orig_h, lb.orig_w, lb.size], "timings_ms": timings}
        if upload:
            emit(Message(dict(header, event="result")), True)
        else:  # to the language stage, through the broker
            emit(Message(header, {"image_tokens": enc.image_tokens, "image_embedding": enc.image_embedding}), True)

    def _answer(self, msg: Message, emit: Emit) -> None:
        header = msg.header
        task = self._check_task(header)
        prompts, generation, text = self._precheck(msg, task)
        enc, timings = self._handed_on(msg) if self.stage == "language" else self._encoding(msg)
        seq = [0]

        def on_text(piece: str) -> None:
            seq[0] += 1
            emit(Message({"event": "token", "seq": seq[0], "text": piece}), False)

        stream = header.get("stream", False) is True
        result = self.predictor.predict_encoded(enc, text, prompts, task, generation, on_text if stream else None,
                                                timings)
        out = result.to_json()
        out["image_id"] = enc.key.split("|", 1)[0]
        emit(Message({"event": "result", "result": out}), True)

    def _handed_on(self, msg: Message) -> tuple[EncodedImage, dict]:
        enc_h = msg.header.get("encoded")
        tokens, embedding = msg.tensors.get("image_tokens"), msg.tensors.get("image_embedding")
        if not isinstance(enc_h, dict) or tokens is None or embedding is None:
            raise ProtocolError(ErrorCode.INTERNAL, "language stage got a request without its encoding")
        h, w, size = enc_h["letterbox"]
        enc = EncodedImage(Letterbox(h, w, size), enc_h["modality"], tokens, embedding, enc_h["image_id"])
        return enc, dict(enc_h["timings_ms"])

    @staticmethod
    def _check_task(header: dict) -> str:
        task = header.get("task", "auto")
        if task not in MODEL_TASKS:
            raise ProtocolError(ErrorCode.UNKNOWN_TASK, f"unknown task {task!r}")
        return task


def handle_safely(handler: RequestHandler, msg: Message, emit: Emit) -> None:
    """``handler.handle`` with every failure turned into one final error reply: a worker
    answers every request it takes exactly once and keeps serving. Unexpected failures
    are also printed with their traceback for the operator."""
    try:
        handler.handle(msg, emit)
    except ProtocolError as exc:
        emit(Message(error_header(None, exc.code, exc.message)), True)
    except Exception as exc:  # the worker's boundary: reported to the client and the log, never dropped
        traceback.print_exc(file=sys.stderr)
        emit(Message(error_header(None, ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")), True)
