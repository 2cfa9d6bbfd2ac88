"""Token generation over the ``llm`` part's feed-dict interface (any runner: the
PyTorch reference, ONNX Runtime, TensorRT). Greedy or sampled, with stop tokens,
stop strings and a streaming callback.

One sequence is a generator (``generate_steps``) that yields each ``llm`` feed it needs
and is sent the outputs, so that the caller decides how feeds run: ``generate`` runs them
one by one; ``generate_batch`` runs the decode steps of several sequences as one batched
call (their KV left-padded to a common length and masked), each sequence ending on its own."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .errors import InputError
from .config import LLMConfig
from .llm import kv_names


@dataclass(frozen=True)
class GenerationConfig:
    """``do_sample=False`` is greedy; sampling uses ``temperature``, ``top_k`` (0 = off),
    ``top_p`` (1 = off) and ``seed``. Generation ends at a stop token, at one of
    ``stop_strings`` (cut from the text) or after ``max_new_tokens``."""

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_strings: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise InputError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.do_sample and self.temperature <= 0:
            raise InputError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InputError(f"top_k must be >= 0, got {self.top_k}")


@dataclass
class Generated:
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop", "stop_string" or "length"
    prompt_hidden: list[np.ndarray] = field(default_factory=list)  # (hidden,) at requested prompt positions
    seg_hidden: list[np.ndarray] = field(default_factory=list)  # (hidden,) of each generated [SEG]
    prefill_ms: float = 0.0
    decode_ms: list[float] = field(default_factory=list)
    prefix: "PrefixKV | None" = None  # the prompt's first positions' KV, when asked for (keep_prefix)


@dataclass
class PrefixKV:
    """The KV of a prompt's first ``length`` positions (the system prompt, the modality tag
    and the image tokens: the same for every prompt on one image), kept so that a later
    prompt on that image prefills only its own tokens. ``kv``: ``past_key_values.*`` name ->
    ``(1, kv_heads, length, head_dim)`` float32."""

    length: int
    kv: dict[str, np.ndarray]

    @property
    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in self.kv.values()))


def prefill_feed(embeds: np.ndarray, llm_cfg: LLMConfig, prefix: PrefixKV | None = None) -> dict[str, np.ndarray]:
    """The ``llm`` feed for a prompt ``(T, hidden)``, batch 1: every position after a zero-length
    past KV, or, with ``prefix``, the positions after ``prefix.length`` on top of its KV."""
    t = embeds.shape[0]
    start = prefix.length if prefix is not None else 0
    if not 0 <= start < t:
        raise ValueError(f"a prefix of {start} positions leaves nothing to prefill in a prompt of {t}")
    empty = np.zeros((1, llm_cfg.kv_heads, 0, llm_cfg.head_dim), dtype=np.float32)
    past = prefix.kv if prefix is not None else dict.fromkeys(kv_names(llm_cfg.layers, "past_key_values"), empty)
    return {"inputs_embeds": embeds[None, start:].astype(np.float32), "attention_mask": np.ones((1, t), dtype=np.int64),
            "position_ids": np.arange(start, t, dtype=np.int64)[None], **past}


def step_feed(token_embed: np.ndarray, position: int, out: dict[str, np.ndarray], llm_cfg: LLMConfig) -> dict:
    """The ``llm`` feed for one new token ``(hidden,)`` at ``position`` on top of the
    present KV of the previous output ``out``."""
    feed = {"inputs_embeds": token_embed[None, None].astype(np.float32),
            "attention_mask": np.ones((1, position + 1), dtype=np.int64),
            "position_ids": np.array([[position]], dtype=np.int64)}
    names = zip(kv_names(llm_cfg.layers, "past_key_values"), kv_names(llm_cfg.layers, "present"))
    feed.update({p: out[n] for p, n in names})
    return feed


def choose_token(logits: np.ndarray, cfg: GenerationConfig, rng: np.random.Generator) -> int:
    """``(vocab,)`` float logits -> the next token id."""
    if not cfg.do_sample:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / cfg.temperature
    if cfg.top_k:
        kth = np.partition(z, -cfg.top_k)[-cfg.top_k]
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z - z.max())
    p /= p.sum()
    if cfg.top_p < 1:
        order = np.argsort(-p)
        keep = np.cumsum(p[order]) - p[order] < cfg.top_p
        mask = np.zeros_like(p, dtype=bool)
        mask[order[keep]] = True
        p = np.where(mask, p, 0.0)
        p /= p.sum()
    return int(rng.choice(p.size, p=p))


def generate(llm, inputs_embeds: np.ndarray, embed_table: np.ndarray, llm_cfg: LLMConfig, cfg: GenerationConfig,
             stop_ids: set[int], seg_id: int, decode: Callable[[list[int]], str],
             capture: tuple[int, ...] = (), on_text: Callable[[str], None] | None = None,
             prefix: PrefixKV | None = None, keep_prefix: int = 0) -> Generated:
    """Prefill ``inputs_embeds`` ``(1, T, hidden)`` then decode, every feed through ``llm``
    (a runner: ``llm(feed) -> outputs`` with the names of ``llm.py``). The arguments after
    ``llm`` are ``generate_steps``'."""
    return drive(llm, generate_steps(inputs_embeds, embed_table, llm_cfg, cfg, stop_ids, seg_id, decode, capture,
                                     on_text, prefix, keep_prefix))


def drive(llm, steps) -> Generated:
    """Run one ``generate_steps`` generator to its end, every feed through ``llm``."""
    try:
        feed = next(steps)
        while True:
            feed = steps.send(llm(feed))
    except StopIteration as done:
        return done.value


def generate_steps(inputs_embeds: np.ndarray, embed_table: np.ndarray, llm_cfg: LLMConfig, cfg: GenerationConfig,
                   stop_ids: set[int], seg_id: int, decode: Callable[[list[int]], str],
                   capture: tuple[int, ...] = (), on_text: Callable[[str], None] | None = None,
                   prefix: PrefixKV | None = None, keep_prefix: int = 0):
    """One sequence as a generator: yields the prefill feed of ``inputs_embeds`` ``(1, T,
    hidden)``, then one feed per decode step (``step_feed``: one token on top of the past KV),
    each answered by ``send(outputs)``; returns the ``Generated`` (``StopIteration.value``).

    The past KV is always fed (zero-length at prefill), so one graph serves both phases.
    ``capture``: prompt positions whose last hidden state to return (the forced ``[SEG]``).
    ``on_text``: called with each new piece of text as it is generated.
    ``prefix``: the KV of the prompt's first positions, computed before (only the rest is
    prefilled); else, with ``keep_prefix`` > 0, the KV of the first ``keep_prefix`` positions
    is returned in ``Generated.prefix`` for later prompts. Times are from a feed's yield to
    its answer (in a batch: the batch's call).
    """
    import time

    rng = np.random.default_rng(cfg.seed)
    t = inputs_embeds.shape[1]
    first = prefix.length if prefix is not None else 0
    start = time.perf_counter()
    out = yield prefill_feed(inputs_embeds[0], llm_cfg, prefix)
    result = Generated([], "", "length", prefill_ms=(time.perf_counter() - start) * 1e3)
    result.prompt_hidden = [out["last_hidden_state"][0, p - first].copy() for p in capture]
    if prefix is None and 0 < keep_prefix < t:
        names = zip(kv_names(llm_cfg.layers, "past_key_values"), kv_names(llm_cfg.layers, "present"))
        result.prefix = PrefixKV(keep_prefix, {p: np.ascontiguousarray(out[n][:, :, :keep_prefix]) for p, n in names})
    emitted = ""
    for step in range(cfg.max_new_tokens):
        tok = choose_token(out["logits"][0], cfg, rng)
        if tok in stop_ids:
            result.finish_reason = "stop"
            break
        result.token_ids.append(tok)
        text = decode(result.token_ids)
        cut = min((text.find(s) for s in cfg.stop_strings if s in text), default=-1)
        if cut >= 0:
            text = text[:cut]
        if on_text is not None and text.startswith(emitted) and len(text) > len(emitted):
            on_text(text[len(emitted):])
            emitted = text
        result.text = text
        if cut >= 0:
            result.finish_reason = "stop_string"
            break
        if step == cfg.max_new_tokens - 1 and tok != seg_id:
            break  # the last token's own state is needed only for a [SEG]
        start = time.perf_counter()
        out = yield step_feed(embed_table[tok], t + step, out, llm_cfg)
        result.decode_ms.append((time.perf_counter() - start) * 1e3)
        if tok == seg_id:
            result.seg_hidden.append(out["last_hidden_state"][0, 0].copy())
    return result


def generate_batch(llm, sequences: list, llm_cfg: LLMConfig) -> list[Generated]:
    """Drive several ``generate_steps`` generators together (``DecodeBatch``): each prefill runs
    alone (prompts differ in length), then every live sequence's decode step runs in one ``llm``
    call of batch ``len(live)``; a sequence that ends leaves the batch. Returns their
    ``Generated`` in order. The answers are those of ``generate`` one by one (tested token for
    token)."""
    batch = DecodeBatch(llm, llm_cfg)
    results: dict[int, Generated] = {}
    for i, seq in enumerate(sequences):
        done = batch.add(i, seq)
        if done is not None:
            results[i] = done
    while batch.live:
        results.update(batch.step())
    return [results[i] for i in range(len(sequences))]  # (batch.widest is dropped with the batch)


class DecodeBatch:
    """Continuous batching of ``generate_steps`` generators on one ``llm`` runner: ``add``
    runs a new sequence's prefill at once (alone: prompts differ in length) and puts it in
    the batch; ``step`` runs one decode step of every live sequence in one call of batch
    ``len(live)`` (``batch_step``: past KVs left-padded and masked) and returns the sequences
    that ended. Sequences join and leave between steps, each with its own keys.
    ``widest[key]``: the most sequences a live one has shared a decode step with, itself
    included (taken out with ``pop_widest`` once it ended)."""

    def __init__(self, llm, llm_cfg: LLMConfig) -> None:
        self.llm, self.llm_cfg = llm, llm_cfg
        self.sequences: dict = {}  # key -> generator
        self.pending: dict = {}  # key -> its next (decode) feed
        self.widest: dict = {}

    @property
    def live(self) -> int:
        return len(self.pending)

    def _advance(self, key, out: dict | None) -> Generated | None:
        seq = self.sequences[key]
        try:
            self.pending[key] = next(seq) if out is None else seq.send(out)
        except StopIteration as done:
            self.sequences.pop(key)
            self.pending.pop(key, None)
            return done.value
        return None

    def add(self, key, sequence) -> Generated | None:
        """Prefill ``sequence`` (a ``generate_steps`` generator) under ``key``; its ``Generated``
        when it already ended (no decode step), else ``None`` (it is in the batch)."""
        if key in self.sequences:
            raise ValueError(f"a sequence {key!r} is already in the batch")
        self.sequences[key] = sequence
        self.widest[key] = 1
        try:
            done = self._advance(key, None)
            return done if done is not None else self._advance(key, self.llm(self.pending[key]))
        except BaseException:
            self.drop(key)
            raise

    def step(self) -> dict:
        """One decode step of every live sequence: ``{key: Generated}`` of those that ended.
        If the ``llm`` call raises, the batch is left as it was (``drop`` its sequences)."""
        order = list(self.pending)
        feeds = [self.pending[k] for k in order]
        outs = unbatch_step(self.llm(batch_step(feeds, self.llm_cfg)), feeds, self.llm_cfg)
        for key in order:
            self.widest[key] = max(self.widest[key], len(order))
        ended = {}
        for key, out in zip(order, outs):
            done = self._advance(key, out)
            if done is not None:
                ended[key] = done
        return ended

    def drop(self, key) -> None:
        """Take a sequence out of the batch unfinished (its request failed or was cancelled)."""
        self.sequences.pop(key, None)
        self.pending.pop(key, None)
        self.widest.pop(key, None)

    def pop_widest(self, key) -> int:
        """``widest[key]`` of a sequence that ended, forgotten here."""
        return self.widest.pop(key, 1)


def batch_step(feeds: list[dict], llm_cfg: LLMConfig) -> dict[str, np.ndarray]:
    """One ``llm`` feed of batch ``len(feeds)`` from single-token ``step_feed``s whose past
    lengths ``P_i`` differ: each past KV is left-padded with zeros to ``max(P_i)`` and its
    ``attention_mask`` row is 0 there, so padding is never attended; positions stay each
    sequence's own."""
    if len(feeds) == 1:
        return feeds[0]
    past_names = kv_names(llm_cfg.layers, "past_key_values")
    lengths = [f["attention_mask"].shape[1] - 1 for f in feeds]
    p = max(lengths)
    mask = np.zeros((len(feeds), p + 1), dtype=np.int64)
    for i, n in enumerate(lengths):
        mask[i, p - n:] = 1
    batch = {"inputs_embeds": np.concatenate([f["inputs_embeds"] for f in feeds]), "attention_mask": mask,
             "position_ids": np.concatenate([f["position_ids"] for f in feeds])}
    for name in past_names:
        kv = np.zeros((len(feeds), llm_cfg.kv_heads, p, llm_cfg.head_dim), dtype=np.float32)
        for i, (f, n) in enumerate(zip(feeds, lengths)):
            kv[i, :, p - n:] = f[name][0]
        batch[name] = kv
    return batch


def unbatch_step(out: dict[str, np.ndarray], feeds: list[dict], llm_cfg: LLMConfig) -> list[dict[str, np.ndarray]]:
    """The outputs of a ``batch_step`` call, split back into what each feed alone returns
    (``logits`` ``(1, vocab)``, ``last_hidden_state`` ``(1, 1, hidden)``, ``present.*`` without
    the left padding)."""
    if len(feeds) == 1:
        return [out]
    present = kv_names(llm_cfg.layers, "present")
    total = out[present[0]].shape[2]
    split = []
    for i, f in enumerate(feeds):
        n = f["attention_mask"].shape[1]  # its past + the new token
        one = {"logits": out["logits"][i:i + 1], "last_hidden_state": out["last_hidden_state"][i:i + 1]}
        one.update({name: np.ascontiguousarray(out[name][i:i + 1, :, total - n:]) for name in present})
        split.append(one)
    return split


def hidden_states_at(llm, embeds: np.ndarray, positions: list[int], llm_cfg: LLMConfig) -> list[np.ndarray]:
    """Last hidden states at ``positions`` of ``embeds`` ``(T, hidden)``, from one pass of
    the ``llm`` runner with an empty cache. Used when text comes from an engine that does
    not return hidden states (TensorRT-LLM): the ``[SEG]`` states are read here."""
    if not positions:
        return []
    out = llm(prefill_feed(embeds, llm_cfg))
    return [out["last_hidden_state"][0, p].copy() for p in positions]
