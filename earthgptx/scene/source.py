"""Windowed reading of a scene through rasterio: its size, bands, georeferencing and
no-data, one window at a time, and a decimated overview (GDAL uses the file's overviews
where it has them). Arrays come back ``(H, W)`` or ``(H, W, C)`` in the file's dtype, as
``imageio.read_image`` returns them, so ``processing.preprocess`` treats both alike."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError

GDAL_CACHE_MB = 64  # GDAL's block cache while a scene is open (its default is 5 % of memory)


def _rasterio():
    try:
        import rasterio
    except ImportError as exc:
        raise InputError("whole scenes need rasterio: pip install -e \".[geo]\" (rasterio, shapely, pyproj)") from exc
    return rasterio


@dataclass(frozen=True)
class Window:
    """A rectangle of the scene in pixels: ``row``, ``col`` of its top-left corner, its
    ``height`` and ``width``."""

    row: int
    col: int
    height: int
    width: int


class SceneSource:
    """An open scene. ``height``, ``width``, ``bands``, ``dtype``; ``transform`` (an
    ``affine.Affine`` from pixel column/row to CRS x/y, pixel-corner convention) and ``crs``
    (``rasterio.crs.CRS`` or None); ``georeferenced``: whether either is set. Use as a
    context manager."""

    def __init__(self, path: str | Path) -> None:
        rasterio = _rasterio()
        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(f"scene file not found: {self.path}")
        # GDAL keeps decoded blocks in a cache of 5 % of the machine's memory by default: over a
        # whole scene that fills up and looks like the scene being held; bound it
        self._env = rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB)
        self._env.__enter__()
        try:
            self._src = rasterio.open(self.path)
        except rasterio.errors.RasterioError as exc:
            self._env.__exit__(None, None, None)
            raise InputError(f"cannot open {self.path} with rasterio (GDAL): {exc}") from exc
        s = self._src
        self.height, self.width, self.bands = s.height, s.width, s.count
        self.dtype = np.dtype(s.dtypes[0])
        self.transform, self.crs = s.transform, s.crs
        self.georeferenced = s.crs is not None or not s.transform.is_identity
        self.bands_used = list(range(1, min(self.bands, 3) + 1))  # the first three bands (RGB), or one

    def __enter__(self) -> "SceneSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._src.close()
        self._env.__exit__(None, None, None)

    @property
    def resolution(self) -> float:
        """Ground size of a pixel in CRS units (the larger of x and y)."""
        return float(max(abs(self.transform.a), abs(self.transform.e)))

    def _layout(self, data: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(data[0] if data.shape[0] == 1 else np.moveaxis(data, 0, -1))

    def read(self, window: Window, out_size: tuple[int, int] | None = None) -> np.ndarray:
        """The pixels of ``window`` (resampled to ``out_size`` = (H, W) when given, bilinear)."""
        from rasterio.enums import Resampling
        from rasterio.windows import Window as RioWindow

        rio = RioWindow(window.col, window.row, window.width, window.height)
        shape = None if out_size is None else (len(self.bands_used), *out_size)
        data = self._src.read(self.bands_used, window=rio, out_shape=shape, resampling=Resampling.bilinear)
        return self._layout(data)

    def valid(self, window: Window) -> np.ndarray:
        """``(H, W)`` bool: pixels of ``window`` that hold data (GDAL's mask: no-data value,
        alpha or internal mask; every pixel where the file declares none)."""
        from rasterio.windows import Window as RioWindow

        return self._src.read_masks(1, window=RioWindow(window.col, window.row, window.width, window.height)) > 0

    def overview(self, max_side: int) -> tuple[np.ndarray, float]:
        """The whole scene decimated so that its longer side is at most ``max_side``, and the
        factor (scene pixels per overview pixel)."""
        factor = max(1.0, max(self.height, self.width) / max_side)
        size = (max(1, round(self.height / factor)), max(1, round(self.width / factor)))
        return self.read(Window(0, 0, self.height, self.width), size), factor
