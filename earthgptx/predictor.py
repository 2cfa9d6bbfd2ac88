"""Every task through one ``predict``: the chain of the four parts, run through runners
so that the PyTorch reference and the deployed engines share this code.

Tasks (``task="auto"`` picks one from the text and the prompts):
* ``caption``, ``classify``, ``vqa`` (scene level): text;
* ``region``: text about the visual prompts (``<regionK>`` tokens);
* ``grounding``: ``[SEG]`` is forced; one box per connected component of the pixel
  decoder's mask (``box_sources`` ``pixel_decoder``), then boxes the model writes in text;
* ``segment``: ``[SEG]`` is forced; pixel decoder -> masks, scores and boxes;
  point/box prompts are also given to the decoder;
* ``click``: no LLM; the point/box prompts go straight to the pixel decoder
  (interactive clicks on an already-encoded image).
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Callable, Generator

import numpy as np

from .config import ModelConfig
from .errors import InputError
from .generation import Generated, GenerationConfig, drive, generate_batch, generate_steps
from .image_cache import DEFAULT_CACHE_BYTES, DEFAULT_PREFIX_CACHE_BYTES, ImageCache, encoding_key, image_id
from .processing import (Letterbox, VisualPrompts, check_modality, component_boxes, decoder_points,
                         parse_text_boxes, preprocess, prompt_encoder_feed, zoom_factor, zoom_window)
from .prompting import IMAGE_TOKEN, SEG_TOKEN, STOP_TOKENS, build_prompt, region_token, splice
from .rle import mask_to_rle
from .tasks import TASKS

_SEGMENT_WORDS = re.compile(r"\b(segment\w*|mask\w*|outline\w*)\b", re.I)
_GROUND_WORDS = re.compile(r"\b(where|locate\w*|find|ground\w*|detect\w*|bounding box\w*|box of)\b", re.I)
_CLASSIFY_WORDS = re.compile(r"\b(classify|classification|categor\w*|which class|what (kind|type) of scene)\b", re.I)
_CAPTION_WORDS = re.compile(r"\b(describe|caption\w*|summari[sz]e)\b", re.I)


def resolve_task(task: str, text: str, has_prompts: bool) -> str:
    if task not in TASKS:
        raise InputError(f"unknown task {task!r}; use one of: {', '.join(TASKS)}")
    if task != "auto":
        return task
    if _SEGMENT_WORDS.search(text):
        return "segment"
    if _GROUND_WORDS.search(text):
        return "grounding"
    if has_prompts:
        return "region"
    if _CLASSIFY_WORDS.search(text):
        return "classify"
    if _CAPTION_WORDS.search(text):
        return "caption"
    return "vqa"


@dataclass
class EncodedImage:
    """An image's ``vision_encoder`` outputs (batch 1) and the letterbox that maps the
    model frame back to it. ``image_tokens``: ``(1, N, hidden)`` float32;
    ``image_embedding``: ``(1, C, G, G)`` float32; ``key``: the cache key."""

    letterbox: Letterbox
    modality: str
    image_tokens: np.ndarray
    image_embedding: np.ndarray
    key: str = ""

    @property
    def nbytes(self) -> int:
        return int(self.image_tokens.nbytes + self.image_embedding.nbytes)


@dataclass
class Prediction:
    """``boxes``: ``(K, 4)`` XYXY pixels of the original image, first one per decoder
    query (aligned with ``scores``, and with ``masks`` for ``segment``/``click``), then
    those written in the text; ``box_sources`` says which. ``masks``: ``(H, W)`` bool."""

    text: str
    task: str
    boxes: np.ndarray
    boxes_normalized: np.ndarray
    box_sources: list[str]
    masks: list[np.ndarray]
    scores: list[float]
    timings_ms: dict[str, float]
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = ""

    def to_json(self) -> dict:
        return {
            "text": self.text,
            "task": self.task,
            "boxes": [[round(float(v), 2) for v in b] for b in self.boxes],
            "boxes_normalized": [[round(float(v), 4) for v in b] for b in self.boxes_normalized],
            "box_sources": self.box_sources,
            "masks": [mask_to_rle(m) for m in self.masks],
            "scores": [float(s) for s in self.scores],
            "timings_ms": {k: round(v, 2) for k, v in self.timings_ms.items()},
            "finish_reason": self.finish_reason,
        }


@dataclass
class PendingAnswer:
    """A request between ``Predictor.begin`` and its ``Prediction``: ``steps``, the LLM's
    ``generate_steps`` generator to drive (``None``: nothing to decode), and ``finish``,
    ``Generated | None -> Prediction`` (pixel decoder and post-processing)."""

    steps: Generator | None
    finish: Callable[[Generated | None], Prediction]


class Predictor:
    """Chains the four parts. ``runners`` maps each part name to a runner (feed dict
    in, feed dict out); ``embed_table`` ``(vocab, hidden)`` float32 embeds text ids."""

    def __init__(self, runners: dict, tokenizer, config: ModelConfig, embed_table: np.ndarray,
                 cache_bytes: int = DEFAULT_CACHE_BYTES, text_generator=None,
                 prefix_cache_bytes: int = DEFAULT_PREFIX_CACHE_BYTES) -> None:
        self.runners = runners
        # optional: an engine that generates text itself (TensorRT-LLM); see runners/tensorrt_llm_runner.py
        self.text_generator = text_generator
        self.tokenizer = tokenizer
        self.config = config
        self.embed_table = embed_table
        self.cache = ImageCache(cache_bytes)
        # per encoded image: the LLM's KV of the system prompt, modality tag and image tokens
        # (generation.PrefixKV), so a second prompt on an image prefills only its own tokens
        self.prefix_cache = ImageCache(prefix_cache_bytes)
        ids = tokenizer.convert_tokens_to_ids
        self.image_id = ids(IMAGE_TOKEN)
        self.seg_id = ids(SEG_TOKEN)
        self.region_ids = [ids(region_token(k + 1)) for k in range(config.prompt.max_regions)]
        self.stop_ids = {i for i in (ids(t) for t in STOP_TOKENS) if i is not None and i != tokenizer.unk_token_id}

    @classmethod
    def from_model(cls, model, tokenizer) -> "Predictor":
        """The PyTorch reference as runners."""
        from .runner import TorchRunner
        from . import llm, pixel_decoder, prompt_encoder, vision_encoder
        from .llm import kv_names

        n = model.llm.num_layers
        runners = {
            "vision_encoder": TorchRunner("vision_encoder", model.vision_encoder, vision_encoder.INPUT_NAMES,
                                          vision_encoder.OUTPUT_NAMES),
            "prompt_encoder": TorchRunner("prompt_encoder", model.prompt_encoder, prompt_encoder.INPUT_NAMES,
                                          prompt_encoder.OUTPUT_NAMES),
            "llm": TorchRunner("llm", model.llm, llm.INPUT_NAMES, llm.OUTPUT_NAMES,
                               kv_names(n, "past_key_values"), kv_names(n, "present")),
            "pixel_decoder": TorchRunner("pixel_decoder", model.pixel_decoder, pixel_decoder.INPUT_NAMES,
                                         pixel_decoder.OUTPUT_NAMES),
        }
        table = model.llm.embed_table.detach().numpy()
        return cls(runners, tokenizer, model.config, table)

    # -- image --------------------------------------------------------------------
    def clear_cache(self) -> None:
        """Forget encoded images and their prompt prefixes (the next request runs the vision
        encoder and the whole prefill again)."""
        self.cache.clear()
        self.prefix_cache.clear()

    def cached(self, image_key: str, modality: str, **options) -> EncodedImage | None:
        """The cached encoding of the image whose ``image_id`` is ``image_key``, or None."""
        return self.cache.get(encoding_key(image_key, modality, options))

    def encode_image(self, image: np.ndarray, modality: str, image_key: str | None = None, cache: bool = True,
                     **options) -> tuple[EncodedImage, float]:
        """Preprocess + ``vision_encoder``, cached by content (``image_key`` defaults to
        ``image_id(image)``). Returns the encoding and the vision encoder's time in ms
        (0 on a cache hit). ``cache=False``: an image seen once (a scene's tile): neither
        looked up nor kept, and its prompt prefix is not kept either (its ``key`` is empty)."""
        image = np.asarray(image)
        check_modality(modality)
        key = encoding_key(image_key or image_id(image), modality, options) if cache else ""
        enc = self.cache.get(key) if cache else None
        if enc is not None:
            return enc, 0.0
        prepared = preprocess(image, modality, self.config.vision.image_size, **options)
        start = time.perf_counter()
        out = self.runners["vision_encoder"]({"pixel_values": prepared.pixel_values})
        ms = (time.perf_counter() - start) * 1e3
        enc = EncodedImage(prepared.letterbox, modality, out["image_tokens"], out["image_embedding"], key)
        if cache:
            self.cache.put(key, enc, enc.nbytes)
        return enc, ms

    # -- the one entry point --------------------------------------------------------
    def predict(self, image: np.ndarray, modality: str, text: str, prompts: VisualPrompts | None = None,
                task: str = "auto", generation: GenerationConfig | None = None,
                on_text: Callable[[str], None] | None = None, cache: bool = True, zoom: bool = True,
                **preprocess_options) -> Prediction:
        """Answer ``text`` about ``image`` (see the module docstring for the tasks).
        ``cache=False`` for images seen once (see ``encode_image``). ``zoom``: a request with
        visual prompts on an image larger than its modality's window (``zoom_window``) is
        answered on that window around its prompts (masks, boxes and
        ``boxes_normalized`` still in the whole image's frames, boxes written in the text in the
        window's); ``False``: on the whole image."""
        prompts = prompts or VisualPrompts([], [], [])
        task = self.check_request(text, prompts, task)
        image = np.asarray(image)
        self._check_prompts(image, prompts)
        window = self.zoom_window(image.shape, prompts, modality) if zoom else None
        if window is not None:
            preprocess_options = dict(preprocess_options, window=window)
        start = time.perf_counter()
        enc, vision_ms = self.encode_image(image, modality, cache=cache, **preprocess_options)
        timings = {"preprocess": (time.perf_counter() - start) * 1e3 - vision_ms, "vision_encoder": vision_ms}
        return self.predict_encoded(enc, text, prompts, task, generation, on_text, timings)

    def zoom_window(self, shape: tuple[int, ...], prompts: VisualPrompts,
                    modality: str) -> tuple[int, int, int, int] | None:
        """The window ``predict`` (and the server) answer ``prompts`` on a ``modality`` image of
        ``shape`` ``(H, W[, C])`` in: ``processing.zoom_window`` at this model's input side and
        the modality's ``zoom_factor`` (model sides: 2 for SAR, 3 for optical, 0.75 for
        infrared), or None."""
        if len(shape) < 2:
            return None
        return zoom_window(shape[0], shape[1], prompts, self.config.vision.image_size, zoom_factor(modality))

    def _check_prompts(self, image: np.ndarray, prompts: VisualPrompts) -> None:
        """Refuse prompts outside ``image`` before any work (an unreadable image is refused by
        the pre-processing)."""
        if image.ndim >= 2 and min(image.shape[:2]) > 0:
            prompts.check(Letterbox(image.shape[0], image.shape[1], self.config.vision.image_size))

    def check_request(self, text: str, prompts: VisualPrompts, task: str) -> str:
        """Refuse a bad request before any work; returns the resolved task."""
        task = resolve_task(task, text, len(prompts) > 0)
        if IMAGE_TOKEN in text or SEG_TOKEN in text:
            raise InputError(f"--text must not contain {IMAGE_TOKEN} or {SEG_TOKEN}: they are placed by the model")
        if len(prompts) > self.config.prompt.max_regions:
            raise InputError(f"{len(prompts)} visual prompts given; this model takes at most "
                             f"{self.config.prompt.max_regions}")
        if task == "click" and not len(prompts):
            raise InputError("task 'click' needs at least one --point or --box")
        return task

    def predict_encoded(self, enc: EncodedImage, text: str, prompts: VisualPrompts | None = None,
                        task: str = "auto", generation: GenerationConfig | None = None,
                        on_text: Callable[[str], None] | None = None,
                        timings: dict[str, float] | None = None) -> Prediction:
        """``predict`` on an already encoded image (the runtime's second stage)."""
        pending = self.begin(enc, text, prompts, task, generation, on_text, timings)
        if pending.steps is None:
            return pending.finish(None)
        return pending.finish(self.run_steps(pending.steps))

    def begin(self, enc: EncodedImage, text: str, prompts: VisualPrompts | None = None, task: str = "auto",
              generation: GenerationConfig | None = None, on_text: Callable[[str], None] | None = None,
              timings: dict[str, float] | None = None) -> "PendingAnswer":
        """``predict_encoded`` in two halves, for a caller that steps the decoding of several
        requests together (``generation.DecodeBatch``, the server's workers): checks the request,
        runs the prompt encoder and returns the ``PendingAnswer`` whose ``steps`` (a
        ``generate_steps`` generator; ``None`` for clicks) the caller drives through the ``llm``
        runner, and whose ``finish(generated)`` gives the ``Prediction``. With a text-generating
        engine (TensorRT-LLM) the text is generated here and ``steps`` is ``None``."""
        prompts = prompts or VisualPrompts([], [], [])
        task = self.check_request(text, prompts, task)
        prompts.check(enc.letterbox)
        timings = dict(timings or {})
        if task == "click":
            return PendingAnswer(None, lambda gen: self._answer(enc, prompts, task, None, timings))
        ids, embeds, capture, region_tokens = self._llm_input(enc, text, prompts, task, timings)
        if self.text_generator is not None:
            gen = self.text_generator.generate(self, ids, embeds, enc.image_tokens[0], region_tokens,
                                               generation or GenerationConfig(), capture, on_text)
            return PendingAnswer(None, lambda _: self._finish(enc, prompts, task, gen, timings))
        return PendingAnswer(self._steps(enc, ids, embeds, capture, generation, on_text),
                             lambda gen: self._finish(enc, prompts, task, gen, timings))

    def _finish(self, enc: EncodedImage, prompts: VisualPrompts, task: str, gen: Generated,
                timings: dict[str, float]) -> Prediction:
        if gen.prefix is not None:
            self.prefix_cache.put(enc.key, gen.prefix, gen.prefix.nbytes)
        timings["llm"] = gen.prefill_ms + sum(gen.decode_ms)
        timings["llm_prefill"], timings["llm_decode"] = gen.prefill_ms, sum(gen.decode_ms)
        return self._answer(enc, prompts, task, gen, timings)

    def predict_many(self, images: list[np.ndarray], modality: str, text: str, prompts: VisualPrompts | None = None,
                     task: str = "auto", generation: GenerationConfig | None = None,
                     **preprocess_options) -> list[Prediction]:
        """``predict`` of one ``text`` (and the same visual prompts) on several images seen
        once (a scene's tiles): one ``vision_encoder`` call of batch ``len(images)``, then their
        decoding stepped together (``generation.generate_batch``). The answers are ``predict``'s
        with ``cache=False``, image by image; ``timings_ms`` share the batched calls' time
        equally. With a text-generating engine (TensorRT-LLM) the images go one by one."""
        prompts = prompts or VisualPrompts([], [], [])
        task = self.check_request(text, prompts, task)
        check_modality(modality)
        images = [np.asarray(im) for im in images]
        if len(images) <= 1 or self.text_generator is not None:
            return [self.predict(im, modality, text, prompts, task, generation, cache=False, **preprocess_options)
                    for im in images]
        for im in images:
            self._check_prompts(im, prompts)
        size = self.config.vision.image_size
        start = time.perf_counter()
        prepared = [preprocess(im, modality, size, **preprocess_options) for im in images]
        mid = time.perf_counter()
        out = self.runners["vision_encoder"]({"pixel_values": np.concatenate([p.pixel_values for p in prepared])})
        n = len(images)
        shared = {"preprocess": (mid - start) * 1e3 / n, "vision_encoder": (time.perf_counter() - mid) * 1e3 / n}
        encs = [EncodedImage(p.letterbox, modality, out["image_tokens"][i:i + 1], out["image_embedding"][i:i + 1])
                for i, p in enumerate(prepared)]
        timings = [dict(shared) for _ in encs]
        gens: list[Generated | None] = [None] * n
        if task != "click":
            inputs = [self._llm_input(enc, text, prompts, task, t) for enc, t in zip(encs, timings)]
            steps = [self._steps(enc, ids, embeds, capture, generation, None)
                     for enc, (ids, embeds, capture, _) in zip(encs, inputs)]
            gens = generate_batch(self.runners["llm"], steps, self.config.llm)
            for gen, t in zip(gens, timings):
                t["llm"] = gen.prefill_ms + sum(gen.decode_ms)
        return [self._answer(enc, prompts, task, gen, t) for enc, gen, t in zip(encs, gens, timings)]

    def _llm_input(self, enc: EncodedImage, text: str, prompts: VisualPrompts, task: str,
                   timings: dict[str, float]) -> tuple:
        """The LLM's input for one request: ``(ids, embeds (T, hidden), capture, region_tokens)``;
        runs the prompt encoder for visual prompts (its time into ``timings``)."""
        region_tokens = None
        if len(prompts):
            feed = {"image_tokens": enc.image_tokens,
                    **prompt_encoder_feed(prompts, enc.letterbox, self.config.prompt.mask_size)}
            start = time.perf_counter()
            region_tokens = self.runners["prompt_encoder"](feed)["region_tokens"][0]
            timings["prompt_encoder"] = (time.perf_counter() - start) * 1e3
        force_seg = task in ("segment", "grounding")
        ids = self.tokenizer(build_prompt(text, enc.modality, len(prompts), force_seg),
                             add_special_tokens=False, return_tensors="np")["input_ids"][0]
        embeds = splice(ids, self.embed_table, enc.image_tokens[0], region_tokens, self.image_id, self.region_ids)
        capture = (embeds.shape[0] - 1,) if force_seg else ()
        return ids, embeds, capture, region_tokens

    def _steps(self, enc: EncodedImage, ids: np.ndarray, embeds: np.ndarray, capture: tuple,
               generation: GenerationConfig | None, on_text):
        """The generation of one request as ``generation.generate_steps``, on top of the image's
        cached prompt prefix when there is one (and keeping it when there is not)."""
        # the positions up to the last image token are the same for every prompt on this image
        prefix_len = int(np.flatnonzero(ids == self.image_id)[0]) + enc.image_tokens.shape[1]
        prefix = self.prefix_cache.get(enc.key) if enc.key else None
        return generate_steps(embeds[None], self.embed_table, self.config.llm, generation or GenerationConfig(),
                              self.stop_ids, self.seg_id, self.decode_tokens, capture, on_text,
                              prefix=prefix, keep_prefix=prefix_len if enc.key else 0)

    def run_steps(self, steps) -> Generated:
        """Drive one ``generate_steps`` generator (``PendingAnswer.steps``) through the ``llm`` runner."""
        return drive(self.runners["llm"], steps)

    def _answer(self, enc: EncodedImage, prompts: VisualPrompts, task: str, gen: Generated | None,
                timings: dict[str, float]) -> Prediction:
        """Pixel decoder and post-processing after the text: the ``Prediction``."""
        lb = enc.letterbox
        seg_states = (gen.prompt_hidden + gen.seg_hidden) if gen is not None else []
        gen_text, token_ids, finish = (gen.text, gen.token_ids, gen.finish_reason) if gen is not None else ("", [], "")
        masks, scores, dec_boxes = [], [], np.zeros((0, 4))
        if seg_states or task == "click":
            start = time.perf_counter()
            logits, scores, dec_boxes = self._decode_masks(enc, prompts, seg_states)
            timings["pixel_decoder"] = (time.perf_counter() - start) * 1e3
            if task in ("segment", "click", "grounding"):
                start = time.perf_counter()
                masks = [lb.mask_from_model(m) for m in logits]
                if task == "grounding":  # one box per object the mask holds, not one round them all
                    comps = [component_boxes(m) for m in masks]
                    scores = [float(s) for s, c in zip(scores, comps) for _ in range(len(c))]
                    dec_boxes = lb.boxes_to_model(np.concatenate(comps).reshape(-1, 4)) if comps else np.zeros((0, 4))
                    masks = []
                timings["postprocess"] = (time.perf_counter() - start) * 1e3

        text_boxes = parse_text_boxes(gen_text)
        boxes = np.concatenate([lb.mask_boxes_from_model(dec_boxes),
                                lb.boxes_from_normalized(text_boxes)]).reshape(-1, 4)
        return Prediction(
            text=gen_text, task=task, boxes=boxes,
            boxes_normalized=Letterbox(lb.orig_h, lb.orig_w, lb.size).boxes_to_normalized(boxes),
            box_sources=["pixel_decoder"] * len(dec_boxes) + ["text"] * len(text_boxes),
            masks=masks, scores=[float(s) for s in scores], timings_ms=timings,
            token_ids=token_ids, finish_reason=finish,
        )

    def decode_tokens(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def _decode_masks(self, enc: EncodedImage, prompts: VisualPrompts, seg_states: list[np.ndarray]):
        """One decoder query per ``[SEG]`` state (or one query without, for clicks); every
        query also carries the point/box prompts."""
        hidden = self.config.llm.hidden
        q = max(1, len(seg_states))
        seg = np.zeros((1, q, hidden), dtype=np.float32)
        valid = np.zeros((1, q), dtype=np.float32)
        for i, s in enumerate(seg_states):
            seg[0, i], valid[0, i] = s, 1.0
        coords, labels = decoder_points(prompts, enc.letterbox)
        out = self.runners["pixel_decoder"]({
            "image_embedding": enc.image_embedding, "seg_hidden": seg, "seg_valid": valid,
            "point_coords": np.broadcast_to(coords, (1, q, *coords.shape)).copy(),
            "point_labels": np.broadcast_to(labels, (1, q, *labels.shape)).copy(),
        })
        return out["masks"][0], out["scores"][0], out["boxes"][0]
