"""Tiles over a scene and the merge of what each tile found.

Frames: scene pixels are ``(col, row)`` = ``(x, y)`` with the origin at the top-left corner
of the top-left pixel (the same convention as the boxes of ``egx predict``); a tile's own
pixels are mapped into it by the tile's affine (offset, and a scale when the tile was
resampled to a target ground-sample distance)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..evaluation.metrics import box_iou
from .source import Window


def plan_tiles(height: int, width: int, tile: int, overlap: int) -> list[Window]:
    """Windows of ``tile`` x ``tile`` scene pixels stepping by ``tile - overlap``, the last of
    each row and column flush with the scene's edge (so every pixel is covered and no window
    hangs outside); a scene smaller than a tile is one window."""
    if tile < 1 or not 0 <= overlap < tile:
        raise ValueError(f"tile {tile} and overlap {overlap}: need tile >= 1 and 0 <= overlap < tile")

    def starts(n: int) -> list[int]:
        if n <= tile:
            return [0]
        out = list(range(0, n - tile, tile - overlap))
        return out + [n - tile]

    return [Window(r, c, min(tile, height), min(tile, width)) for r in starts(height) for c in starts(width)]


@dataclass
class SceneObject:
    """One object in scene pixels: ``box`` XYXY edges; ``geometry`` a shapely polygon (None
    for box-only answers); ``score``; ``tiles``: how many tiles saw a part of it."""

    box: tuple[float, float, float, float]
    score: float
    geometry: object = None
    tiles: int = 1
    properties: dict = field(default_factory=dict)


def tile_affine(window: Window, out_h: int, out_w: int):
    """``affine.Affine`` from a tile's own pixels (``out_h`` x ``out_w``) to scene pixels."""
    from affine import Affine

    return Affine(window.width / out_w, 0.0, window.col, 0.0, window.height / out_h, window.row)


def mask_polygons(mask: np.ndarray, to_scene) -> list:
    """The connected parts of a tile's ``(H, W)`` bool mask as shapely polygons in scene pixels."""
    from rasterio.features import shapes
    from shapely.geometry import shape

    if not mask.any():
        return []
    return [shape(geom) for geom, value in shapes(mask.astype(np.uint8), mask=mask, connectivity=8,
                                                   transform=to_scene) if value]


def merge_masks(pieces: list[tuple[object, float, dict]]) -> list[SceneObject]:
    """Per-tile polygons ``(geometry, score, properties)`` -> objects: pieces that overlap or
    touch (one object seen by two overlapping tiles, or cut by a border) become one, scored by
    its best piece, whose properties (the tile's answer text) it keeps."""
    from shapely import STRtree, unary_union
    from shapely.geometry import MultiPolygon

    if not pieces:
        return []
    geoms = [p[0] for p in pieces]
    merged = unary_union(geoms)
    parts = list(merged.geoms) if isinstance(merged, MultiPolygon) else [merged]
    tree = STRtree(geoms)
    out = []
    for part in parts:
        hits = [int(i) for i in tree.query(part, predicate="intersects")]
        best = max(hits, key=lambda i: pieces[i][1])
        out.append(SceneObject(tuple(float(v) for v in part.bounds), pieces[best][1], part, len(hits),
                               dict(pieces[best][2])))
    return sorted(out, key=lambda o: (o.box[1], o.box[0]))


def merge_boxes(boxes: np.ndarray, scores: np.ndarray, iou: float = 0.5, contained: float = 0.8,
                properties: list[dict] | None = None) -> list[SceneObject]:
    """Greedy non-maximum suppression over the tiles' boxes ``(N, 4)`` in scene pixels: the
    best-scored box is kept (with its ``properties[i]``) and every box that overlaps it by
    more than ``iou``, or lies inside it by more than ``contained`` of its own area (the part
    of an object a tile border cut off), goes."""
    order = np.argsort(-scores, kind="stable")
    kept: list[int] = []
    suppressed = np.zeros(len(boxes), dtype=bool)
    areas = np.clip(boxes[:, 2:] - boxes[:, :2], 0, None).prod(-1)
    for i in order:
        if suppressed[i]:
            continue
        kept.append(int(i))
        lt = np.maximum(boxes[i, :2], boxes[:, :2])
        rb = np.minimum(boxes[i, 2:], boxes[:, 2:])
        inter = np.clip(rb - lt, 0, None).prod(-1)
        inside = np.where(areas > 0, inter / np.maximum(areas, 1e-12), 0.0)
        suppressed |= (box_iou(boxes[i:i + 1], boxes)[0] > iou) | (inside > contained)
    return [SceneObject(tuple(float(v) for v in boxes[i]), float(scores[i]),
                        properties=dict(properties[i]) if properties else {}) for i in kept]
