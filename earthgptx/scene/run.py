"""``run_scene``: zoom out, then zoom in tile by tile, through one ``Predictor``.

Memory: one tile at a time is read and answered (its pixels, the pre-processing at the
model's input size and the masks of one tile; ``batch`` tiles with ``SceneOptions.batch``),
plus the polygons found so far; the scene
itself is never read whole (the overview is a decimated read). So peak memory is bounded by
the tile size, not the scene's."""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..errors import InputError
from ..generation import GenerationConfig
from .source import SceneSource, Window
from .tiling import SceneObject, merge_boxes, merge_masks, mask_polygons, plan_tiles, tile_affine

SCENE_TASKS = ("segment", "grounding")  # zoom in: per tile, objects merged
OVERVIEW_TASKS = ("caption", "classify")  # zoom out only: the text answered on the overview


@dataclass(frozen=True)
class SceneOptions:
    """``tile``: tile side in pixels (of the scene, or of the scene resampled to ``gsd``);
    None: the model's input side, so that no tile is scaled down before the model sees it;
    ``overlap``: pixels shared by neighbouring tiles (at least the size of the largest object,
    so each one is whole in some tile);
    ``gsd``: resample tiles to this ground-sample distance (CRS units per pixel; None: the
    scene's own); ``overview_text``: the zoom-out question (None: no zoom-out answer);
    ``max_tiles``: refuse plans larger than this; ``batch``: tiles answered together in
    process (``Predictor.predict_many``: one vision call, decoding stepped together; the same
    answers, and ``batch`` tiles in memory at once)."""

    tile: int | None = None
    overlap: int = 64
    gsd: float | None = None
    overview_text: str | None = "Describe this image."
    max_tiles: int = 100_000
    max_new_tokens: int = 32
    batch: int = 1


@dataclass
class SceneResult:
    """``objects`` in scene pixels; ``overview``: the zoom-out answer's text; ``tiles``:
    planned / answered / skipped_no_data."""

    objects: list[SceneObject]
    overview: str | None
    task: str
    tiles: dict = field(default_factory=dict)
    seconds: float = 0.0


def run_scene(predictor, source: SceneSource, modality: str, text: str, task: str = "segment",
              opts: SceneOptions = SceneOptions(), progress: Callable[[int, int], None] | None = None,
              preprocess_options: dict | None = None, executor=None, in_flight: int = 4) -> SceneResult:
    """Answer ``text`` over ``source``: per tile ``predictor.predict(tile, modality, text,
    task=task)``, objects merged across tiles; plus the zoom-out answer on an overview.
    ``progress(done, total)`` after each tile. ``executor`` (a ``concurrent.futures``
    executor; None: one tile at a time here): tiles are read here and answered there, at most
    ``in_flight`` at once (so a server's workers each have one; memory stays bounded)."""
    if task not in SCENE_TASKS + OVERVIEW_TASKS:
        raise InputError(f"egx scene answers {' or '.join(SCENE_TASKS)} per tile, or {' or '.join(OVERVIEW_TASKS)} "
                         f"on the whole scene, not {task!r}")
    if opts.batch < 1:
        raise InputError(f"--batch {opts.batch}: answer at least one tile at a time")
    start = time.perf_counter()
    pre = preprocess_options or {}
    size = predictor.config.vision.image_size
    overview = None
    if task in OVERVIEW_TASKS:  # a scene-level answer: the text itself, on the overview; no tiles
        image, _ = source.overview(2 * size)
        gen = GenerationConfig(max_new_tokens=opts.max_new_tokens)
        overview = predictor.predict(image, modality, text, task=task, generation=gen, **pre).text
        return SceneResult([], overview, task, {"planned": 0, "answered": 0, "skipped_no_data": 0},
                           time.perf_counter() - start)
    if opts.overview_text:
        image, _ = source.overview(2 * size)
        gen = GenerationConfig(max_new_tokens=opts.max_new_tokens)
        overview = predictor.predict(image, modality, opts.overview_text, generation=gen, **pre).text
    step = 1.0
    if opts.gsd is not None:
        if not source.georeferenced:
            raise InputError("--gsd needs a georeferenced scene (its pixel size comes from the GeoTIFF)")
        step = opts.gsd / source.resolution  # scene pixels per tile pixel
    tile_px = opts.tile or size
    tile = max(1, round(tile_px * step))
    overlap = round(opts.overlap * step)
    if not 0 <= overlap < tile:
        raise InputError(f"--overlap {opts.overlap} must be at least 0 and smaller than the tile ({tile_px} px)")
    windows = plan_tiles(source.height, source.width, tile, overlap)
    if len(windows) > opts.max_tiles:
        raise InputError(f"{len(windows)} tiles of {tile} px: more than --max-tiles {opts.max_tiles}; "
                         "use a larger --tile or a coarser --gsd")
    pieces, boxes, scores, props = [], [], [], []
    gen = GenerationConfig(max_new_tokens=opts.max_new_tokens)

    def answer(pixels: np.ndarray):  # a tile is seen once: nothing of it is cached
        return predictor.predict(pixels, modality, text, task=task, generation=gen, cache=False, **pre)

    def collect(w: Window, resampled: bool, valid: np.ndarray, shape: tuple, pred) -> None:
        to_scene = tile_affine(w, shape[0], shape[1])
        said = {"text": pred.text}  # what the model answered on the tile the object came from
        if task == "segment":
            for m, s in zip(pred.masks, pred.scores):
                keep = m if resampled else m & valid  # nothing is found where there is no data
                pieces.extend((g, float(s), said) for g in mask_polygons(keep, to_scene))
        else:
            for i, b in enumerate(pred.boxes):  # text boxes (after the decoder's) have no score
                boxes.append((to_scene.c + to_scene.a * b[0], to_scene.f + to_scene.e * b[1],
                              to_scene.c + to_scene.a * b[2], to_scene.f + to_scene.e * b[3]))
                scores.append(float(pred.scores[i]) if i < len(pred.scores) else 0.0)
                props.append(said)

    skipped = done = 0
    pending: deque = deque()  # tiles sent to the executor, oldest first

    def finished() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, len(windows))

    batched: list[tuple] = []  # tiles read and waiting for a batch (executor None, opts.batch > 1)

    def answer_batch() -> None:
        preds = predictor.predict_many([b[-1] for b in batched], modality, text, task=task, generation=gen, **pre)
        for (w, resampled, valid, pixels), pred in zip(batched, preds):
            collect(w, resampled, valid, pixels.shape, pred)
            finished()
        batched.clear()

    for w in windows:  # read here, one window at a time (rasterio datasets are not thread-safe)
        valid = source.valid(w)
        if not valid.any():
            skipped += 1
            finished()
            continue
        out = (round(w.height / step), round(w.width / step)) if step != 1.0 else None
        pixels = source.read(w, out)
        if executor is None and opts.batch > 1:
            batched.append((w, out is not None, valid, pixels))
            if len(batched) == opts.batch:
                answer_batch()
            continue
        if executor is None:
            collect(w, out is not None, valid, pixels.shape, answer(pixels))
            finished()
            continue
        pending.append((w, out is not None, valid, pixels.shape, executor.submit(answer, pixels)))
        while len(pending) >= in_flight or (pending and pending[0][-1].done()):
            *queued, future = pending.popleft()
            collect(*queued, future.result())
            finished()
    if batched:
        answer_batch()
    while pending:
        *queued, future = pending.popleft()
        collect(*queued, future.result())
        finished()
    if task == "segment":
        objects = merge_masks(pieces)
    else:
        objects = merge_boxes(np.asarray(boxes, dtype=np.float64).reshape(-1, 4), np.asarray(scores, dtype=np.float64),
                              properties=props)
    tiles = {"planned": len(windows), "answered": len(windows) - skipped, "skipped_no_data": skipped,
             "tile_scene_px": tile, "tile_px": tile_px,
             "pieces": len(pieces) if task == "segment" else len(boxes)}
    return SceneResult(objects, overview, task, tiles, time.perf_counter() - start)
