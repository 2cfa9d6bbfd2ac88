"""Text from a TensorRT-LLM engine inside the chain: image and region tokens go in as the
prompt-embedding table; the ``[SEG]`` hidden states, which TensorRT-LLM's generation does
not return, come from one pass of the ``llm`` graph over prompt + generated tokens."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from earthgptx.generation import Generated, GenerationConfig, hidden_states_at


class PromptTableTextGenerator:
    """``generate(predictor, ids, embeds, image_tokens, region_tokens, cfg, capture, on_text)``
    with the same result as the chain's own KV-cache loop. ``engine`` is any object with
    ``generate(table_ids, table, cfg, end_ids) -> new token ids``: TensorRT-LLM's
    (``TensorRTLLMEngine`` below) or, in tests, a stand-in."""

    def __init__(self, engine) -> None:
        self.engine = engine

    def generate(self, predictor, ids: np.ndarray, embeds: np.ndarray, image_tokens: np.ndarray,
                 region_tokens: np.ndarray | None, cfg: GenerationConfig, capture: tuple[int, ...],
                 on_text=None) -> Generated:
        from .prompt_table import prompt_table, prompt_table_ids

        vocab = predictor.embed_table.shape[0]
        table_ids = prompt_table_ids(ids, predictor.image_id, len(image_tokens), predictor.region_ids, vocab)
        table = prompt_table(image_tokens, region_tokens, predictor.config.prompt.max_regions)
        start = time.perf_counter()
        new = [int(t) for t in self.engine.generate(table_ids, table, cfg, sorted(predictor.stop_ids))]
        finish = "length"
        for i, t in enumerate(new):
            if t in predictor.stop_ids:
                new, finish = new[:i], "stop"
                break
        text = predictor.decode_tokens(new)
        for s in cfg.stop_strings:
            if s in text:
                text, finish = text[: text.find(s)], "stop_string"
        if on_text is not None and text:
            on_text(text)
        elapsed = (time.perf_counter() - start) * 1e3
        seg_at = [len(embeds) + i for i, t in enumerate(new) if t == predictor.seg_id]
        states = []
        if capture or seg_at:
            full = np.concatenate([embeds, predictor.embed_table[new]]) if new else embeds
            states = hidden_states_at(predictor.runners["llm"], full, list(capture) + seg_at, predictor.config.llm)
        n = len(capture)
        return Generated(new, text, finish, prompt_hidden=states[:n], seg_hidden=states[n:], prefill_ms=elapsed)


class TensorRTLLMEngine:
    """A TensorRT-LLM engine folder run by ``tensorrt_llm.runtime.ModelRunner``."""

    def __init__(self, engine_dir: str | Path) -> None:
        from tensorrt_llm.runtime import ModelRunner

        self.runner = ModelRunner.from_dir(engine_dir=str(engine_dir))

    def generate(self, table_ids: np.ndarray, table: np.ndarray, cfg: GenerationConfig, end_ids: list[int]) -> list[int]:
        import torch

        batch = [torch.from_numpy(table_ids.astype(np.int32))]
        table_t = torch.from_numpy(table).to(torch.float16)[None].cuda()
        out = self.runner.generate(
            batch, max_new_tokens=cfg.max_new_tokens, end_id=end_ids[0], pad_id=end_ids[0],
            temperature=cfg.temperature, top_k=cfg.top_k if cfg.do_sample else 1,
            top_p=cfg.top_p if cfg.do_sample else 0.0, random_seed=cfg.seed,
            prompt_table=table_t, prompt_tasks="0")
        return out[0, 0].tolist()[len(table_ids):]
