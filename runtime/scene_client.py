"""``egx query --scene``: a whole scene tiled on the client side, its tiles sent to
``egx serve`` several at a time (one ``Client`` per sending thread), merged as ``egx scene``
merges them (``earthgptx.scene``). A worker that dies mid-tile costs a retry, not the scene:
the server retries the request once on another worker and the client resends on silence."""
from __future__ import annotations

import threading
from types import SimpleNamespace

import numpy as np

from earthgptx.rle import rle_to_mask

from .client import Client


class ServedPredictor:
    """What ``earthgptx.scene.run.run_scene`` needs of a predictor (``config.vision.image_size``
    and ``predict``), answered by a server. Thread-safe: each thread has its own ``Client``."""

    def __init__(self, address: str, timeout_s: float, retries: int, server_key=None, client_keys=None) -> None:
        self._args = (address, timeout_s, retries, server_key, client_keys)
        self._local = threading.local()
        self._clients: list[Client] = []
        self._lock = threading.Lock()
        size = self._client().ping().get("image_size")
        if not size:
            from earthgptx.errors import EarthGPTXError

            raise EarthGPTXError(f"{address} did not say its model's input size: is it an `egx serve` of this version?")
        self.config = SimpleNamespace(vision=SimpleNamespace(image_size=int(size)))

    def _client(self) -> Client:
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = Client(*self._args)
            with self._lock:
                self._clients.append(client)
        return client

    def predict(self, image: np.ndarray, modality: str, text: str, prompts=None, task: str = "auto",
                generation=None, cache: bool = True, **preprocess) -> SimpleNamespace:
        """``cache`` is the server's to decide (each worker's caches are bounded LRUs)."""
        gen = {"max_new_tokens": generation.max_new_tokens} if generation is not None else {}
        out = self._client().predict(image, modality, text, task=task, generation=gen, preprocess=preprocess)
        return SimpleNamespace(text=out["text"], masks=[rle_to_mask(m) for m in out["masks"]], scores=out["scores"],
                               boxes=np.asarray(out["boxes"], dtype=np.float64).reshape(-1, 4))

    def close(self) -> None:
        with self._lock:
            for client in self._clients:
                client.close()
            self._clients.clear()
