"""The image-embedding cache: a client sends an image once, then many prompts, and the
later prompts skip the vision encoder. Keyed by content, bounded in bytes, LRU."""
from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from .errors import InputError

DEFAULT_CACHE_BYTES = 256 * 2**20
# the LLM KV of each image's prompt prefix (Predictor.prefix_cache): 30 layers x 2 x 3 heads x
# ~300 positions x 64 x 4 bytes = 14 MB an image for edge (256 image tokens), 2.6 MB for small
DEFAULT_PREFIX_CACHE_BYTES = 128 * 2**20


def image_id(image: np.ndarray) -> str:
    """The content id of a raw image array: SHA-256 (hex) of
    ``"<dtype.str>|<d0>x<d1>[x<d2>]|"`` (e.g. ``"|u1|800x800x3|"``) followed by the
    C-order bytes. The wire protocol uses the same id (docs/protocol.md)."""
    image = np.ascontiguousarray(image)
    if image.dtype.kind not in "biufc":
        raise InputError(f"an image must be a numeric array, got dtype {image.dtype}")
    h = hashlib.sha256(f"{image.dtype.str}|{'x'.join(str(d) for d in image.shape)}|".encode())
    h.update(image.view(np.uint8).data if image.size else b"")
    return h.hexdigest()


def encoding_key(image_key: str, modality: str, options: dict) -> str:
    """One encoding per (image, modality, preprocessing options)."""
    return f"{image_key}|{modality}|{json.dumps(options, sort_keys=True)}"


@dataclass
class CacheStats:
    entries: int
    bytes: int
    max_bytes: int
    hits: int
    misses: int
    evictions: int


class ImageCache:
    """LRU of ``key -> value`` holding at most ``max_bytes`` (the sizes given to ``put``).
    A value larger than the whole budget is not kept. ``max_bytes=0`` disables caching."""

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        if max_bytes < 0:
            raise ValueError(f"cache size must be >= 0 bytes, got {max_bytes}")
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, tuple[object, int]] = OrderedDict()
        self._bytes = 0
        self.hits = self.misses = self.evictions = 0

    def get(self, key: str):
        item = self._items.get(key)
        if item is None:
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return item[0]

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def put(self, key: str, value, nbytes: int) -> None:
        if key in self._items:
            self._bytes -= self._items.pop(key)[1]
        if nbytes > self.max_bytes:
            return
        self._items[key] = (value, nbytes)
        self._bytes += nbytes
        while self._bytes > self.max_bytes:
            _, (_, n) = self._items.popitem(last=False)
            self._bytes -= n
            self.evictions += 1

    def clear(self) -> None:
        self._items.clear()
        self._bytes = 0

    def stats(self) -> CacheStats:
        return CacheStats(len(self._items), self._bytes, self.max_bytes, self.hits, self.misses, self.evictions)
