"""The Python client: requests with streamed replies, the Lazy Pirate retry (a fresh
socket, the same request id, so the server never runs a request twice), image reuse
by content id, and CURVE."""
from __future__ import annotations

import uuid
from typing import Callable

import numpy as np

from earthgptx.errors import EarthGPTXError
from earthgptx.image_cache import image_id

from .protocol import FINAL, PARTIAL, PROTOCOL, REQUEST, SERVICE, ErrorCode, Message, parse_message


class ServerError(EarthGPTXError):
    """An error reply; ``code`` is one of ``protocol.ErrorCode``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


class ServerUnavailable(EarthGPTXError):
    """No reply after every retry."""


class Client:
    """One connection to ``egx serve``. ``timeout_s``: the longest silence between two
    replies of a request before a retry; ``retries``: how many times a request is sent
    again (same id). CURVE: ``server_key`` (public) and ``client_keys`` (public, secret).
    Without CURVE every request carries this client's random ``session`` secret, so that a
    retry on a fresh socket reaches the same request (and cached images); with CURVE the
    server knows the client by its key."""

    def __init__(self, address: str, timeout_s: float = 30.0, retries: int = 3, server_key: bytes | None = None,
                 client_keys: tuple[bytes, bytes] | None = None) -> None:
        import zmq

        if (server_key is None) != (client_keys is None):
            raise EarthGPTXError("CURVE needs both the server's public key and this client's key pair")
        self.address, self.timeout_s, self.retries = address, timeout_s, retries
        self.server_key, self.client_keys = server_key, client_keys
        self.ctx = zmq.Context.instance()
        self.sock = None
        self.session = None if server_key is not None else uuid.uuid4().hex
        self.uploaded: set[tuple[str, str]] = set()  # (image id, modality) this client has sent

    def _connect(self) -> None:
        import zmq

        if self.sock is not None:
            self.sock.close(0)
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        # a send with no connection to queue on (a refused CURVE handshake drops it) would block
        # for ever: it gives up after the timeout instead, and counts as an attempt without reply
        self.sock.sndtimeo = int(self.timeout_s * 1000)
        if self.server_key is not None:
            self.sock.curve_serverkey = self.server_key
            self.sock.curve_publickey, self.sock.curve_secretkey = self.client_keys
        self.sock.connect(self.address)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close(0)
            self.sock = None

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- one request ----------------------------------------------------------------
    def request(self, header: dict, tensors: dict[str, np.ndarray] | None = None,
                on_partial: Callable[[dict], None] | None = None) -> Message:
        """Send a request (``header["id"]`` is set if missing) and return the final reply.
        Partial replies go to ``on_partial`` in order, each once. Raises ``ServerError``
        for an error reply and ``ServerUnavailable`` after ``retries`` silent timeouts."""
        import zmq

        header = dict(header)
        header.setdefault("id", uuid.uuid4().hex)
        if self.session is not None:
            header.setdefault("session", self.session)
        frames = [b"", PROTOCOL, REQUEST, SERVICE, *Message(header, tensors or {}).frames()]
        if self.sock is None:
            self._connect()
        last_seq = 0
        for attempt in range(self.retries + 1):
            if attempt:
                self._connect()  # Lazy Pirate: a fresh socket, the same request id
            try:
                self.sock.send_multipart(frames, copy=False)
            except zmq.Again:
                continue
            while self.sock.poll(int(self.timeout_s * 1000)):
                reply = self.sock.recv_multipart(copy=False)
                if len(reply) < 5 or reply[1].bytes != PROTOCOL:
                    continue
                msg = parse_message([r.buffer for r in reply[4:]])
                if msg.header.get("id") not in (header["id"], None):
                    continue  # a late reply to an earlier request
                if reply[2].bytes == PARTIAL:
                    seq = msg.header.get("seq", 0)
                    if seq > last_seq and on_partial is not None:
                        on_partial(msg.header)
                    last_seq = max(last_seq, seq)
                    continue
                if reply[2].bytes == FINAL:
                    if msg.header.get("event") == "error":
                        err = msg.header.get("error", {})
                        raise ServerError(err.get("code", ErrorCode.INTERNAL), err.get("message", ""))
                    return msg
        self.close()
        hint = ("the server may be refusing this client's CURVE key: is this client's public .key in the "
                "server's --allow folder, and is --server-key the server's public key? (or is `egx serve` "
                "not running there?)" if self.server_key is not None else "is `egx serve` running there?")
        raise ServerUnavailable(f"no reply from {self.address} in {self.timeout_s:g} s, "
                                f"{self.retries + 1} attempt(s); {hint}")

    # -- tasks ----------------------------------------------------------------------
    def ping(self, payload: np.ndarray | None = None) -> dict:
        tensors = {"payload": payload} if payload is not None else {}
        return self.request({"task": "ping"}, tensors).header

    def upload(self, image: np.ndarray, modality: str, **preprocess) -> str:
        """Encode ``image`` on the server (cached there); returns its id for later requests."""
        key = image_id(image)
        spec = {"id": key, "modality": modality, "preprocess": preprocess}
        out = self.request({"task": "upload", "image": spec}, {"image": image}).header
        self.uploaded.add((key, modality))
        return out["image_id"]

    def predict(self, image: np.ndarray, modality: str, text: str = "", points=(), boxes=(), scribbles=(),
                task: str = "auto", generation: dict | None = None, stream: bool = False,
                on_text: Callable[[str], None] | None = None, preprocess: dict | None = None) -> dict:
        """The same request as ``egx predict``; returns its JSON (``Prediction.to_json``
        plus ``image_id``). An image this client has sent before goes by id only; if
        the server no longer has it, it is sent again."""
        image = np.asarray(image)
        key = image_id(image)
        header = {"task": task, "text": text, "image": {"id": key, "modality": modality,
                                                         "preprocess": preprocess or {}},
                  "points": [list(map(float, p)) for p in points], "boxes": [list(map(float, b)) for b in boxes],
                  "generation": generation or {}, "stream": stream}
        tensors = {f"scribble.{i}": np.asarray(m, dtype=np.uint8) for i, m in enumerate(scribbles)}
        on_partial = (lambda h: on_text(h.get("text", ""))) if on_text is not None else None
        if (key, modality) in self.uploaded:
            try:
                return self.request(header, tensors, on_partial).header["result"]
            except ServerError as exc:
                if exc.code != ErrorCode.IMAGE_UNKNOWN:
                    raise
        result = self.request(header, {"image": image, **tensors}, on_partial).header["result"]
        self.uploaded.add((key, modality))
        return result
