"""TensorRT-LLM's prompt-embedding table for the image and region tokens: token ids >=
``vocab_size`` index rows of ``prompt_embedding_table``. The exporter sizes the table
(``export/tensorrt_llm.py``); the runner fills it per request (``tensorrt_llm_runner.py``)."""
from __future__ import annotations

import numpy as np


def prompt_table_ids(ids: np.ndarray, image_id: int, n_image: int, region_ids: list[int], vocab: int) -> np.ndarray:
    """Text ids with ``<image>`` expanded to ``n_image`` ids ``vocab, vocab+1, ...`` and each
    ``<regionK>`` to ``vocab + n_image + K - 1``: the rows of the prompt table that
    ``prompt_table`` below fills."""
    out = []
    for t in ids.tolist():
        if t == image_id:
            out.extend(range(vocab, vocab + n_image))
        elif t in region_ids:
            out.append(vocab + n_image + region_ids.index(t))
        else:
            out.append(t)
    return np.asarray(out, dtype=np.int32)


def prompt_table(image_tokens: np.ndarray, region_tokens: np.ndarray | None, max_regions: int) -> np.ndarray:
    """``(n_image + max_regions, hidden)`` rows for ``prompt_table_ids`` (unused regions zero)."""
    hidden = image_tokens.shape[-1]
    regions = np.zeros((max_regions, hidden), dtype=np.float32)
    if region_tokens is not None:
        regions[: len(region_tokens)] = region_tokens
    return np.concatenate([image_tokens.astype(np.float32), regions])
