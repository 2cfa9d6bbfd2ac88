"""Reading raster files into arrays: PNG/JPEG through OpenCV, TIFF through tifffile,
GeoTIFF through rasterio when it is installed (then the geotransform is kept).

Arrays come back as ``(H, W)`` or ``(H, W, C)`` in the file's own dtype, channels
in RGB(A) order. Nothing here scales values: that is ``processing``'s job.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputError

TIFF_SUFFIXES = (".tif", ".tiff")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", *TIFF_SUFFIXES)  # what read_image reads


@dataclass(frozen=True)
class GeoInfo:
    """Georeferencing of a raster: ``transform`` is the GDAL-order affine
    ``(a, b, c, d, e, f)`` with ``x = a*col + b*row + c``, ``y = d*col + e*row + f``
    (pixel corner convention); ``crs`` is a WKT or EPSG string."""

    transform: tuple[float, float, float, float, float, float]
    crs: str | None

    def pixel_to_geo(self, col: float, row: float) -> tuple[float, float]:
        a, b, c, d, e, f = self.transform
        return a * col + b * row + c, d * col + e * row + f


@dataclass(frozen=True)
class Raster:
    data: np.ndarray
    geo: GeoInfo | None = None


def read_image(path: str | Path) -> Raster:
    """Read an image file. Raises ``InputError`` naming the file if it is missing,
    empty or not a readable image."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"image file not found: {path}")
    if path.stat().st_size == 0:
        raise InputError(f"image file is empty: {path}")
    if path.suffix.lower() in TIFF_SUFFIXES:
        return _read_tiff(path)
    import cv2

    data = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if data is None:
        raise InputError(f"cannot read {path}: not a PNG, JPEG or TIFF image, or the file is corrupt")
    if data.ndim == 3 and data.shape[2] == 3:
        data = data[:, :, ::-1]
    elif data.ndim == 3 and data.shape[2] == 4:
        data = data[:, :, [2, 1, 0, 3]]
    return Raster(np.ascontiguousarray(data))


def _read_tiff(path: Path) -> Raster:
    try:
        import rasterio  # optional: GeoTIFF with georeferencing
    except ImportError:
        rasterio = None
    if rasterio is not None:
        try:
            with rasterio.open(path) as src:
                data = src.read()  # (C, H, W)
                t = src.transform
                geo = GeoInfo((t.a, t.b, t.c, t.d, t.e, t.f), src.crs.to_string() if src.crs else None)
        except rasterio.errors.RasterioError as exc:
            raise InputError(f"cannot read {path} with rasterio: {exc}") from exc
        data = data[0] if data.shape[0] == 1 else np.moveaxis(data, 0, -1)
        has_geo = src.crs is not None or not t.is_identity
        return Raster(np.ascontiguousarray(data), geo if has_geo else None)
    import tifffile

    try:
        data = tifffile.imread(path)
    except (ValueError, OSError, tifffile.TiffFileError) as exc:
        raise InputError(f"cannot read {path} as TIFF: {exc}") from exc
    if data.ndim == 3 and data.shape[0] <= 4 < data.shape[2]:
        data = np.moveaxis(data, 0, -1)  # planar (C, H, W) to (H, W, C)
    return Raster(np.ascontiguousarray(data))


def read_mask(path: str | Path) -> np.ndarray:
    """Read a mask/scribble image: any non-zero pixel is foreground. Returns ``(H, W)`` bool."""
    data = read_image(path).data
    if data.ndim == 3:
        data = data[..., :3].max(axis=-1) if data.shape[2] >= 3 else data[..., 0]
    return data != 0
