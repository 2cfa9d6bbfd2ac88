"""Pre- and post-processing: the one place that knows modalities, the pad-to-square
rule and every coordinate transform. The PyTorch reference, the ONNX/TensorRT
runners and the clients all call this module; nothing re-implements it.

Frames
------
* **original**: pixels of the input image, ``(H, W)``. Points are pixel indices
  ``(x=column, y=row)`` and mean the pixel's centre ``(x + 0.5, y + 0.5)``; boxes are
  continuous edges ``[x0, y0, x1, y1]`` (XYXY, ``x1`` exclusive), as in COCO.
* **model**: the square model input of side ``S``: the image is resized by
  ``S / max(H, W)`` to ``(new_h, new_w)`` and padded at the bottom and right. A request
  with visual prompts on a large image may see only a **window** of it (``zoom_window``):
  then that window is what is resized and padded, and ``Letterbox`` maps to and from it.
* **normalised**: model frame divided by ``S``, i.e. 0-1 of the padded square.
  Boxes written in generated text use this frame (EarthGPT's convention).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from .errors import InputError

MODALITIES = ("optical", "sar", "infrared")
PIXEL_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
PIXEL_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
# Robust stretch limits (percentiles) per modality for data that is not 8-bit display data.
STRETCH_PERCENTILES = {"optical": (0.5, 99.5), "sar": (1.0, 99.5), "infrared": (0.5, 99.9)}


@dataclass(frozen=True)
class Letterbox:
    """The resize-and-pad from an ``(orig_h, orig_w)`` image to an ``S x S`` model input.

    With a **window** (``win_h, win_w > 0``: the ``win_h x win_w`` pixels from column ``x0``,
    row ``y0``; ``zoom_window``) only that part of the image is resized and padded: points,
    boxes and masks still come and go in the whole image's frame, and a mask from the model
    is zero outside the window."""

    orig_h: int
    orig_w: int
    size: int
    x0: int = 0
    y0: int = 0
    win_h: int = 0
    win_w: int = 0

    @property
    def crop_h(self) -> int:
        """Rows of the original the model sees (the window's, else the image's)."""
        return self.win_h or self.orig_h

    @property
    def crop_w(self) -> int:
        return self.win_w or self.orig_w

    @property
    def window(self) -> tuple[int, int, int, int] | None:
        """``(x0, y0, x1, y1)`` edges of the window in the original, or None for the whole image."""
        return (self.x0, self.y0, self.x0 + self.win_w, self.y0 + self.win_h) if self.win_h else None

    @property
    def scale(self) -> float:
        return self.size / max(self.crop_h, self.crop_w)

    @property
    def new_h(self) -> int:
        return max(1, min(self.size, int(round(self.crop_h * self.scale))))

    @property
    def new_w(self) -> int:
        return max(1, min(self.size, int(round(self.crop_w * self.scale))))

    @property
    def sx(self) -> float:
        return self.new_w / self.crop_w

    @property
    def sy(self) -> float:
        return self.new_h / self.crop_h

    def crop(self, a: np.ndarray) -> np.ndarray:
        """The window's part of an ``(H, W, ...)`` array in the original frame (all of it without one)."""
        return a[self.y0:self.y0 + self.crop_h, self.x0:self.x0 + self.crop_w] if self.win_h else a

    # points ------------------------------------------------------------------
    def points_to_model(self, points: np.ndarray) -> np.ndarray:
        """``(..., 2)`` pixel indices (x, y) in the original -> continuous model coordinates."""
        p = np.asarray(points, dtype=np.float64)
        return np.stack([(p[..., 0] - self.x0 + 0.5) * self.sx, (p[..., 1] - self.y0 + 0.5) * self.sy], axis=-1)

    def points_from_model(self, points: np.ndarray) -> np.ndarray:
        p = np.asarray(points, dtype=np.float64)
        return np.stack([p[..., 0] / self.sx - 0.5 + self.x0, p[..., 1] / self.sy - 0.5 + self.y0], axis=-1)

    # boxes -------------------------------------------------------------------
    def boxes_to_model(self, boxes: np.ndarray) -> np.ndarray:
        """``(..., 4)`` XYXY edges in the original -> model frame."""
        b = np.asarray(boxes, dtype=np.float64) - np.array([self.x0, self.y0, self.x0, self.y0])
        return b * np.array([self.sx, self.sy, self.sx, self.sy])

    def boxes_from_model(self, boxes: np.ndarray) -> np.ndarray:
        """Model-frame XYXY -> original pixels, clipped to the image."""
        b = np.asarray(boxes, dtype=np.float64) / np.array([self.sx, self.sy, self.sx, self.sy])
        b = b + np.array([self.x0, self.y0, self.x0, self.y0])
        return np.clip(b, 0, [self.orig_w, self.orig_h, self.orig_w, self.orig_h])

    def mask_boxes_from_model(self, boxes: np.ndarray) -> np.ndarray:
        """The pixel decoder's ``(K, 4)`` tight mask boxes (model frame; all zero for an empty
        mask) -> original pixels, an empty mask's box still all zero (not the window's corner)."""
        b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        return self.boxes_from_model(b) * b.any(axis=1, keepdims=True)

    def boxes_from_normalized(self, boxes: np.ndarray) -> np.ndarray:
        return self.boxes_from_model(np.asarray(boxes, dtype=np.float64) * self.size)

    def boxes_to_normalized(self, boxes: np.ndarray) -> np.ndarray:
        return self.boxes_to_model(boxes) / self.size

    # masks -------------------------------------------------------------------
    def mask_to_model(self, mask: np.ndarray, side: int | None = None) -> np.ndarray:
        """``(H, W)`` bool mask in the original -> ``(side, side)`` float32 0/1 raster of
        the padded square (default ``side = S``). Thin scribbles survive downscaling:
        any coverage of a target pixel makes it 1."""
        import cv2

        side = side or self.size
        k = side / self.size
        w, h = max(1, int(round(self.new_w * k))), max(1, int(round(self.new_h * k)))
        small = cv2.resize(self.crop(mask).astype(np.float32), (w, h), interpolation=cv2.INTER_AREA)
        out = np.zeros((side, side), dtype=np.float32)
        out[:h, :w] = small > 0
        return out

    def mask_coverage(self, mask: np.ndarray) -> np.ndarray:
        """``(H, W)`` bool mask in the original -> ``(S, S)`` float32: the share of each model
        pixel the object covers (area resampling; a soft training target that keeps objects of
        a pixel or two), zero in the padding."""
        import cv2

        small = cv2.resize(self.crop(mask).astype(np.float32), (self.new_w, self.new_h), interpolation=cv2.INTER_AREA)
        out = np.zeros((self.size, self.size), dtype=np.float32)
        out[: self.new_h, : self.new_w] = np.clip(small, 0.0, 1.0)
        return out

    def mask_from_model(self, logits: np.ndarray) -> np.ndarray:
        """``(S, S)`` mask logits in the model frame -> ``(H, W)`` bool mask of the original
        (False outside the window)."""
        import cv2

        crop = np.ascontiguousarray(logits[: self.new_h, : self.new_w], dtype=np.float32)
        part = cv2.resize(crop, (self.crop_w, self.crop_h), interpolation=cv2.INTER_LINEAR) > 0
        if not self.win_h:
            return part
        full = np.zeros((self.orig_h, self.orig_w), dtype=bool)
        full[self.y0:self.y0 + self.crop_h, self.x0:self.x0 + self.crop_w] = part
        return full


@dataclass(frozen=True)
class PreparedImage:
    """``pixel_values``: ``(1, 3, S, S)`` float32, normalised with ``PIXEL_MEAN``/``PIXEL_STD``,
    RGB; ``letterbox`` maps coordinates back; ``modality`` is the tag given."""

    pixel_values: np.ndarray
    letterbox: Letterbox
    modality: str


def check_modality(modality: str) -> str:
    if modality not in MODALITIES:
        raise InputError(f"unknown modality {modality!r}; use one of: {', '.join(MODALITIES)}")
    return modality


def preprocess(image: np.ndarray, modality: str, size: int, *, sar_scaling: str = "auto",
               sar_kind: str = "amplitude", speckle_filter: bool = False,
               window: tuple[int, int, int, int] | None = None) -> PreparedImage:
    """Turn a raw raster into the model input.

    ``image``: ``(H, W)``, ``(H, W, C)`` any numeric dtype, or complex (SAR SLC).
    optical needs 3 bands (RGB) or 4 (RGBA: alpha dropped); SAR and infrared need one
    band (grey PNGs stored as RGB/RGBA/palette with equal channels are accepted).
    8-bit data is taken as display-scaled (``/255``); 16-bit and float data get a
    robust percentile stretch; SAR other than 8-bit is scaled in dB (``sar_scaling``:
    ``"auto"``, ``"db"``, ``"linear"``; ``sar_kind``: ``"amplitude"`` or ``"intensity"``).
    The image is first resized (area averaging, i.e. multi-looking for SAR) so that
    huge scenes never become full-size float copies.
    ``window``: ``(x0, y0, x1, y1)`` pixel edges (``zoom_window``): only that part is prepared
    (and stretched), and the ``letterbox`` maps it back into the whole image's frame.
    """
    import cv2

    check_modality(modality)
    image = np.asarray(image)
    if image.size == 0 or image.ndim not in (2, 3) or min(image.shape[:2]) < 1:
        raise InputError(f"empty or malformed image of shape {image.shape}; expected (H, W) or (H, W, C)")
    bands = _bands_for(image, modality)
    lb = Letterbox(image.shape[0], image.shape[1], size)
    if window is not None:
        x0, y0, x1, y1 = (int(v) for v in window)
        if not (0 <= x0 < x1 <= lb.orig_w and 0 <= y0 < y1 <= lb.orig_h):
            raise InputError(f"window {list(window)} is not inside the {lb.orig_w}x{lb.orig_h} image; "
                             f"give x0,y0,x1,y1 pixel edges with 0 <= x0 < x1 <= {lb.orig_w} and "
                             f"0 <= y0 < y1 <= {lb.orig_h}")
        lb = Letterbox(lb.orig_h, lb.orig_w, size, x0, y0, y1 - y0, x1 - x0)
        bands = lb.crop(bands)
    if np.iscomplexobj(bands):
        if modality != "sar":
            raise InputError(f"complex-valued data is SAR SLC; got modality {modality!r}: use --modality sar")
        bands = np.abs(bands)
    eight_bit = bands.dtype == np.uint8
    work = bands.astype(np.float32, copy=False)
    valid = np.isfinite(work)
    if not valid.any():
        raise InputError("image has no finite pixel (all NaN/inf)")
    if not valid.all():
        work = np.where(valid, work, np.nanmedian(np.where(valid, work, np.nan)))
    if modality == "sar" and sar_kind == "amplitude" and not eight_bit:
        work = work * work  # to intensity, so that area averaging is multi-looking
    elif sar_kind not in ("amplitude", "intensity"):
        raise InputError(f"sar_kind must be 'amplitude' or 'intensity', got {sar_kind!r}")

    interp = cv2.INTER_AREA if lb.scale < 1 else cv2.INTER_LINEAR
    work = cv2.resize(work, (lb.new_w, lb.new_h), interpolation=interp)
    if work.ndim == 2:
        work = work[:, :, None]
    if modality == "sar" and speckle_filter:
        work = lee_filter(work[:, :, 0])[:, :, None]
    unit = _to_unit(work, modality, eight_bit, sar_scaling)
    if unit.shape[2] == 1:
        unit = np.repeat(unit, 3, axis=2)

    canvas = np.zeros((size, size, 3), dtype=np.float32)
    canvas[:] = PIXEL_MEAN  # pad with the mean so that padding normalises to 0
    canvas[: lb.new_h, : lb.new_w] = unit
    pixel_values = ((canvas - PIXEL_MEAN) / PIXEL_STD).transpose(2, 0, 1)[None]
    return PreparedImage(np.ascontiguousarray(pixel_values, dtype=np.float32), lb, modality)


def display_image(image: np.ndarray, modality: str, *, sar_scaling: str = "auto",
                  sar_kind: str = "amplitude") -> np.ndarray:
    """The image as people see it: ``(H, W, 3)`` uint8 RGB in the original frame, scaled
    by the same modality rules as ``preprocess`` (for overlays)."""
    check_modality(modality)
    image = np.asarray(image)
    if image.size == 0 or image.ndim not in (2, 3):
        raise InputError(f"empty or malformed image of shape {image.shape}; expected (H, W) or (H, W, C)")
    bands = _bands_for(image, modality)
    eight_bit = bands.dtype == np.uint8
    work = np.abs(bands).astype(np.float32) if np.iscomplexobj(bands) else bands.astype(np.float32)
    work = np.nan_to_num(work, nan=0.0, posinf=0.0, neginf=0.0)
    if modality == "sar" and sar_kind == "amplitude" and not eight_bit:
        work = work * work
    unit = _to_unit(work if work.ndim == 3 else work[:, :, None], modality, eight_bit, sar_scaling)
    rgb = np.repeat(unit, 3, axis=2) if unit.shape[2] == 1 else unit
    return np.round(rgb * 255).astype(np.uint8)


def _bands_for(image: np.ndarray, modality: str) -> np.ndarray:
    """Select the bands a modality needs; refuse a channel count it cannot take."""
    channels = 1 if image.ndim == 2 else image.shape[2]
    if modality == "optical":
        if channels in (3, 4):
            return image[:, :, :3]
        raise InputError(
            f"optical imagery needs 3 bands (RGB) or 4 (RGBA); got {channels}. "
            "For single-band imagery use --modality sar or --modality infrared.")
    if channels == 1:
        return image if image.ndim == 2 else image[:, :, 0]
    if channels in (3, 4):  # grey stored as RGB/RGBA/palette PNG or JPEG
        rgb = image[:, :, :3]
        if np.array_equal(rgb[:, :, 0], rgb[:, :, 1]) and np.array_equal(rgb[:, :, 0], rgb[:, :, 2]):
            return rgb[:, :, 0]
        if np.iscomplexobj(rgb):
            raise InputError(f"{modality} imagery must be single-band; got {channels} complex bands")
        # near-grey with compression noise or a tint: ITU-R BT.601 luminance, in the file's dtype
        luma = rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        if np.issubdtype(image.dtype, np.integer):
            luma = np.round(luma).astype(image.dtype)
        return luma
    raise InputError(
        f"{modality} imagery must be single-band (or grey stored as RGB/RGBA); got {channels} bands. "
        "Pass one band (e.g. one polarisation), or use --modality optical for colour imagery.")


def _to_unit(work: np.ndarray, modality: str, eight_bit: bool, sar_scaling: str) -> np.ndarray:
    """Scale ``(h, w, c)`` float32 to [0, 1] by the modality's rule."""
    if eight_bit and not (modality == "sar" and sar_scaling == "db"):
        return np.clip(work / 255.0, 0.0, 1.0)
    if modality == "sar":
        if sar_scaling not in ("auto", "db", "linear"):
            raise InputError(f"sar_scaling must be 'auto', 'db' or 'linear', got {sar_scaling!r}")
        if sar_scaling in ("auto", "db"):
            work = 10.0 * np.log10(np.maximum(work, 1e-10))
    lo_p, hi_p = STRETCH_PERCENTILES[modality]
    lo, hi = np.percentile(work, [lo_p, hi_p])
    if hi <= lo:  # a constant image: map to mid-grey rather than dividing by zero
        return np.full_like(work, 0.5)
    return np.clip((work - lo) / (hi - lo), 0.0, 1.0)


def lee_filter(intensity: np.ndarray, window: int = 5) -> np.ndarray:
    """Lee speckle filter on a ``(h, w)`` float32 intensity image (window in pixels).
    The noise level (squared coefficient of variation) is estimated from the image."""
    import cv2

    mean = cv2.blur(intensity, (window, window))
    sq = cv2.blur(intensity * intensity, (window, window))
    var = np.maximum(sq - mean * mean, 0.0)
    cv2_ = var / np.maximum(mean * mean, 1e-12)
    noise = float(np.median(cv2_))
    weight = np.clip(1.0 - noise / np.maximum(cv2_, 1e-12), 0.0, 1.0)
    return (mean + weight * (intensity - mean)).astype(np.float32)


# ---------------------------------------------------------------------------------
# visual prompts

def check_point(point: tuple[float, float], lb: Letterbox) -> None:
    x, y = point
    if not (np.isfinite(x) and np.isfinite(y) and 0 <= x < lb.orig_w and 0 <= y < lb.orig_h):
        raise InputError(
            f"point ({x}, {y}) is outside the {lb.orig_w}x{lb.orig_h} image; points are pixel "
            f"(column, row) with 0 <= x < {lb.orig_w} and 0 <= y < {lb.orig_h}")
    _check_in_window((x, y, x + 1, y + 1), lb, f"point ({x}, {y})")


def _check_in_window(box: tuple[float, float, float, float], lb: Letterbox, what: str) -> None:
    if lb.window is not None:
        x0, y0, x1, y1 = lb.window
        if not (x0 <= box[0] and box[2] <= x1 and y0 <= box[1] and box[3] <= y1):
            raise InputError(f"{what} is outside the window {list(lb.window)} the image was encoded in; "
                             "encode the image with a window that holds every prompt (zoom_window) or without one")


def check_box(box: tuple[float, float, float, float], lb: Letterbox) -> None:
    x0, y0, x1, y1 = box
    if not all(np.isfinite(box)) or not (0 <= x0 < x1 <= lb.orig_w and 0 <= y0 < y1 <= lb.orig_h):
        raise InputError(
            f"box {list(box)} is not inside the {lb.orig_w}x{lb.orig_h} image; boxes are "
            f"x0,y0,x1,y1 pixel edges with 0 <= x0 < x1 <= {lb.orig_w} and 0 <= y0 < y1 <= {lb.orig_h}")
    _check_in_window(box, lb, f"box {list(box)}")


def check_freeform(mask: np.ndarray, lb: Letterbox) -> None:
    if mask.shape != (lb.orig_h, lb.orig_w):
        raise InputError(
            f"free-form mask is {mask.shape[1]}x{mask.shape[0]} but the image is {lb.orig_w}x{lb.orig_h}; "
            "draw the scribble/mask at the image's size")
    if not mask.any():
        raise InputError("free-form mask is empty: draw at least one pixel")
    _check_in_window(mask_box(mask), lb, "the free-form mask")


def mask_box(mask: np.ndarray) -> tuple[float, float, float, float]:
    """Tight XYXY edge box of a non-empty ``(H, W)`` bool mask."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)


# zoom_window's window side per modality, in model sides. SAR ships were learnt at about the
# scale of an 800 px chip squashed to the model side (a few pixels): 2 model sides around a
# click keep them there. Optical objects (roads) run long: 3 model sides (images up to 768 px
# at 256 stay whole). Infrared small targets are masked best a little larger than their own
# pixels: 0.75 model sides (192 px at 256). Chosen on the training split
# (benchmarks/click_windows.py), not on validation.
ZOOM_FACTORS = {"optical": 3.0, "sar": 2.0, "infrared": 0.75}


def zoom_factor(modality: str) -> float:
    """``zoom_window``'s ``factor`` for ``modality`` (``ZOOM_FACTORS``)."""
    return ZOOM_FACTORS[check_modality(modality)]


def zoom_window(h: int, w: int, prompts: "VisualPrompts", size: int,
                factor: float) -> tuple[int, int, int, int] | None:
    """Where to look for a request with visual prompts on an ``(h, w)`` image: ``(x0, y0, x1,
    y1)`` pixel edges of a window of ``factor * size`` pixels a side (or, if larger, 1.25 times
    the prompts' extent and that extent plus a quarter of the window, so that it holds them), on
    a grid of a quarter of ``factor * size``, the grid's window whose centre is nearest the
    prompts' (so the prompts lie at least 3/8 of a full window inside it, and nearby clicks
    share a window and its cached encoding), shifted inside the image; or None (answer on the
    whole image) when there are no prompts or the image is no larger than the window.
    ``factor``: ``zoom_factor(modality)`` (``Predictor.zoom_window``).

    Squashing an 800 px chip or a whole scene to the model's ``size`` leaves a ship a few
    pixels; around a click the window keeps it at about ``1 / factor`` of its original scale,
    as ``egx predict``'s warning for large images advises (a crop of about ``2 * size`` around
    what matters)."""
    base = int(round(factor * size))
    if not len(prompts) or max(h, w) <= base:
        return None
    boxes = [(x, y, x + 1.0, y + 1.0) for x, y in prompts.points] + list(prompts.boxes)
    boxes += [mask_box(m) for m in prompts.freeforms]
    b = np.asarray(boxes, dtype=np.float64)
    ex0, ey0, ex1, ey1 = b[:, 0].min(), b[:, 1].min(), b[:, 2].max(), b[:, 3].max()
    step = max(1, base // 4)  # windows on a grid of a quarter window: nearby clicks share one (and its encoding)
    extent = max(ex1 - ex0, ey1 - ey0)
    # the grid moves the window up to step / 2 off the prompts' centre: extent + step still holds them
    side = int(np.ceil(max(base, 1.25 * extent, extent + step) / step)) * step
    if side >= max(h, w):
        return None

    def span(lo: float, hi: float, n: int) -> tuple[int, int]:
        if side >= n:
            return 0, n
        start = int(np.floor(((lo + hi) / 2 - side / 2) / step + 0.5)) * step
        start = min(max(start, 0), n - side)
        return start, start + side

    x0, x1 = span(ex0, ex1, w)
    y0, y1 = span(ey0, ey1, h)
    return x0, y0, x1, y1


def component_boxes(mask: np.ndarray, min_area: int = 1) -> np.ndarray:
    """XYXY edge boxes ``(K, 4)`` float64 of the 8-connected components of an ``(H, W)`` bool
    mask with at least ``min_area`` pixels, largest first: grounding's boxes, one per object."""
    import cv2

    n, _, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    rows = [stats[i] for i in range(1, n) if stats[i, cv2.CC_STAT_AREA] >= min_area]
    rows.sort(key=lambda r: -int(r[cv2.CC_STAT_AREA]))
    boxes = [[r[cv2.CC_STAT_LEFT], r[cv2.CC_STAT_TOP], r[cv2.CC_STAT_LEFT] + r[cv2.CC_STAT_WIDTH],
              r[cv2.CC_STAT_TOP] + r[cv2.CC_STAT_HEIGHT]] for r in rows]
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 4)


def inside_point(mask: np.ndarray) -> tuple[float, float]:
    """A pixel (x, y) of a non-empty ``(H, W)`` mask nearest to its centroid: a point prompt
    that lies on the object even when the object is not convex."""
    ys, xs = np.nonzero(mask)
    i = int(np.argmin((xs - xs.mean()) ** 2 + (ys - ys.mean()) ** 2))
    return float(xs[i]), float(ys[i])


def crop_boxes(boxes: np.ndarray, x0: float, y0: float) -> np.ndarray:
    """XYXY boxes of an image -> the same boxes in its crop starting at ``(x0, y0)``."""
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 4) - np.array([x0, y0, x0, y0])


def polygon_mask(vertices: np.ndarray, lb: Letterbox) -> np.ndarray:
    """Rasterise a polygon given as ``(K, 2)`` original-frame (x, y) edges to an ``(H, W)`` mask."""
    import cv2

    mask = np.zeros((lb.orig_h, lb.orig_w), dtype=np.uint8)
    cv2.fillPoly(mask, [np.round(np.asarray(vertices)).astype(np.int32)], 1)
    return mask.astype(bool)


# ---------------------------------------------------------------------------------
# boxes in text

_NUM = r"\s*(-?\d*\.?\d+)\s*"
_BOX_RE = re.compile(r"\[" + ",".join([_NUM] * 4) + r"\]")


def parse_text_boxes(text: str) -> np.ndarray:
    """Boxes written in text as ``[x0,y0,x1,y1]`` with values in 0-1 of the padded square.
    Returns ``(N, 4)`` float64 normalised XYXY; malformed or degenerate boxes are ignored."""
    boxes = []
    for m in _BOX_RE.finditer(text):
        b = [float(v) for v in m.groups()]
        if all(0.0 <= v <= 1.0 for v in b) and b[0] < b[2] and b[1] < b[3]:
            boxes.append(b)
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 4)


def format_box(box_normalized: np.ndarray) -> str:
    """The text form of a normalised box: ``[0.123,0.456,0.789,0.900]``."""
    return "[" + ",".join(f"{v:.3f}" for v in box_normalized) + "]"


# ---------------------------------------------------------------------------------
# visual prompts -> part inputs

@dataclass
class VisualPrompts:
    """Visual prompts in the original frame: ``points`` (x, y) pixel indices, ``boxes``
    XYXY edges, ``freeforms`` ``(H, W)`` bool masks (scribbles, polygons, masks).
    ``<regionK>`` numbers them in this order: points, boxes, free-forms."""

    points: list[tuple[float, float]]
    boxes: list[tuple[float, float, float, float]]
    freeforms: list[np.ndarray]

    def __len__(self) -> int:
        return len(self.points) + len(self.boxes) + len(self.freeforms)

    def check(self, lb: Letterbox) -> None:
        for p in self.points:
            check_point(p, lb)
        for b in self.boxes:
            check_box(b, lb)
        for m in self.freeforms:
            check_freeform(m, lb)


def prompt_encoder_feed(prompts: VisualPrompts, lb: Letterbox, mask_size: int) -> dict[str, np.ndarray]:
    """The prompt rows of ``prompt_encoder`` for one image (batch 1):
    ``prompt_boxes`` ``(1, R, 4)`` float32 normalised XYXY (points ``[x, y, -1, -1]``),
    ``prompt_types`` ``(1, R)`` int64, ``prompt_masks`` ``(1, R, M, M)`` float32."""
    from .prompt_encoder import PROMPT_BOX, PROMPT_FREEFORM, PROMPT_POINT

    r = len(prompts)
    boxes = np.zeros((1, r, 4), dtype=np.float32)
    types = np.zeros((1, r), dtype=np.int64)
    masks = np.zeros((1, r, mask_size, mask_size), dtype=np.float32)
    i = 0
    for p in prompts.points:
        boxes[0, i] = [*(lb.points_to_model(np.array(p)) / lb.size), -1.0, -1.0]
        types[0, i] = PROMPT_POINT
        i += 1
    for b in prompts.boxes:
        boxes[0, i] = lb.boxes_to_normalized(np.array(b))
        types[0, i] = PROMPT_BOX
        i += 1
    for m in prompts.freeforms:
        boxes[0, i] = lb.boxes_to_normalized(np.array(mask_box(m)))
        types[0, i] = PROMPT_FREEFORM
        masks[0, i] = lb.mask_to_model(m, mask_size)
        i += 1
    return {"prompt_boxes": boxes, "prompt_types": types, "prompt_masks": masks}


def decoder_points(prompts: VisualPrompts, lb: Letterbox) -> tuple[np.ndarray, np.ndarray]:
    """Point/box prompts of one ``pixel_decoder`` query: ``(P, 2)`` float32 model-frame
    coordinates and ``(P,)`` int64 labels (points foreground; boxes and free-forms'
    boxes as two corners). ``P >= 1``: an empty prompt set is one padding point."""
    from .pixel_decoder import LABEL_BOX_BOTTOM_RIGHT, LABEL_BOX_TOP_LEFT, LABEL_FOREGROUND, LABEL_PAD

    coords, labels = [], []
    for p in prompts.points:
        coords.append(lb.points_to_model(np.array(p)))
        labels.append(LABEL_FOREGROUND)
    for b in list(prompts.boxes) + [mask_box(m) for m in prompts.freeforms]:
        mb = lb.boxes_to_model(np.array(b))
        coords += [mb[:2], mb[2:]]
        labels += [LABEL_BOX_TOP_LEFT, LABEL_BOX_BOTTOM_RIGHT]
    if not coords:
        return np.zeros((1, 2), dtype=np.float32), np.full((1,), LABEL_PAD, dtype=np.int64)
    return np.asarray(coords, dtype=np.float32), np.asarray(labels, dtype=np.int64)
