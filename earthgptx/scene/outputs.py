"""A scene's answer as files: GeoJSON (the scene's CRS, or EPSG:4326), COCO (pixels), a mask
Cloud-Optimised GeoTIFF on the scene's grid, and a decimated overlay PNG."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .run import SceneResult
from .source import SceneSource


def to_geojson(result: SceneResult, source: SceneSource, wgs84: bool = False, tolerance: float = 0.5) -> dict:
    """A FeatureCollection: one feature per object, its mask polygon (or box) in the scene's
    CRS (``wgs84``: EPSG:4326 longitude/latitude through pyproj), simplified by ``tolerance``
    scene pixels; properties ``score``, ``box_px`` (XYXY scene pixels), ``tiles``, ``text``
    (the answer of the tile that saw the object best). Without
    georeferencing the coordinates are scene pixels and the collection says so."""
    import shapely
    from shapely import affinity
    from shapely.geometry import box as make_box, mapping

    t = source.transform
    to_lonlat = None
    if wgs84:
        if source.crs is None:
            from ..errors import InputError

            raise InputError("--wgs84 needs a scene with a CRS (a GeoTIFF); this one has none")
        from pyproj import Transformer

        to_lonlat = Transformer.from_crs(source.crs, "EPSG:4326", always_xy=True).transform
    features = []
    for k, o in enumerate(result.objects):
        geom = o.geometry if o.geometry is not None else make_box(*o.box)
        geom = geom.simplify(tolerance, preserve_topology=True)
        if source.georeferenced:
            geom = affinity.affine_transform(geom, [t.a, t.b, t.d, t.e, t.c, t.f])
            if to_lonlat is not None:
                geom = shapely.transform(geom, lambda xy: np.column_stack(to_lonlat(xy[:, 0], xy[:, 1])))
        features.append({"type": "Feature", "id": k, "geometry": mapping(geom),
                         "properties": {"score": round(o.score, 4), "box_px": [round(v, 2) for v in o.box],
                                        "tiles": o.tiles, **o.properties}})
    crs = "EPSG:4326" if to_lonlat else (source.crs.to_string() if source.crs else None)
    out = {"type": "FeatureCollection", "features": features,
           "properties": {"crs": crs if source.georeferenced else "pixels", "task": result.task,
                          "overview": result.overview, "tiles": result.tiles}}
    if source.georeferenced and source.crs is not None and to_lonlat is None:
        # GeoJSON 2008's named CRS, which GDAL/OGR reads (RFC 7946 files are EPSG:4326 and name none)
        epsg = source.crs.to_epsg()
        out["crs"] = {"type": "name", "properties": {"name": f"urn:ogc:def:crs:EPSG::{epsg}" if epsg
                                                     else source.crs.to_wkt()}}
    return out


def to_coco(result: SceneResult, source: SceneSource, image_name: str) -> dict:
    """COCO detection JSON in scene pixels: one image, one category ("object"), each object's
    ``bbox`` (x, y, w, h), ``area`` and ``segmentation`` polygons (x, y lists)."""
    from shapely.geometry import MultiPolygon

    annotations = []
    for k, o in enumerate(result.objects):
        x0, y0, x1, y1 = o.box
        ann = {"id": k + 1, "image_id": 1, "category_id": 1, "bbox": [x0, y0, x1 - x0, y1 - y0],
               "score": round(o.score, 4), "iscrowd": 0, "area": (x1 - x0) * (y1 - y0)}
        if o.geometry is not None:
            polys = o.geometry.geoms if isinstance(o.geometry, MultiPolygon) else [o.geometry]
            ann["segmentation"] = [[round(v, 2) for xy in p.exterior.coords[:-1] for v in xy] for p in polys]
            ann["area"] = float(o.geometry.area)
        annotations.append(ann)
    return {"images": [{"id": 1, "file_name": image_name, "height": source.height, "width": source.width}],
            "categories": [{"id": 1, "name": "object"}], "annotations": annotations}


def write_json(path: str | Path, data: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def write_mask_geotiff(path: str | Path, result: SceneResult, source: SceneSource, block: int = 1024) -> Path:
    """The objects rasterised onto the scene's grid (same size, transform and CRS): ``uint16``,
    0 background, object ``k`` (1-based, the GeoJSON/COCO order) where its polygon (or box)
    covers a pixel centre; written block by block into a tiled GeoTIFF, then copied as a
    Cloud-Optimised GeoTIFF (deflate, with overviews), so neither step holds the scene."""
    import rasterio
    import rasterio.shutil
    from affine import Affine
    from rasterio.features import rasterize
    from rasterio.windows import Window as RioWindow
    from shapely import STRtree
    from shapely.geometry import box as make_box

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    geoms = [o.geometry if o.geometry is not None else make_box(*o.box) for o in result.objects]
    if len(geoms) >= 2**16:
        raise ValueError(f"{len(geoms)} objects do not fit a uint16 mask")
    tree = STRtree(geoms) if geoms else None
    profile = {"driver": "GTiff", "height": source.height, "width": source.width, "count": 1, "dtype": "uint16",
               "crs": source.crs, "transform": source.transform, "tiled": True, "blockxsize": 256, "blockysize": 256,
               "compress": "deflate", "nodata": None}
    staging = path.with_name(path.stem + ".staging.tif")
    with rasterio.open(staging, "w", **profile) as dst:
        for r in range(0, source.height, block):
            for c in range(0, source.width, block):
                h, w = min(block, source.height - r), min(block, source.width - c)
                data = np.zeros((h, w), dtype=np.uint16)
                if tree is not None:
                    hits = tree.query(make_box(c, r, c + w, r + h))
                    if len(hits):
                        data = rasterize([(geoms[i], int(i) + 1) for i in sorted(hits)], out_shape=(h, w),
                                         transform=Affine.translation(c, r), fill=0, dtype="uint16")
                dst.write(data[None], window=RioWindow(c, r, w, h))
    try:
        rasterio.shutil.copy(staging, path, driver="COG", compress="deflate")
    finally:
        staging.unlink(missing_ok=True)
    return path


def write_overlay(path: str | Path, result: SceneResult, source: SceneSource, modality: str,
                  max_side: int = 2048) -> Path:
    """A PNG of the scene decimated to at most ``max_side`` pixels a side, the objects filled
    and outlined in colour (the overlay colours of ``egx predict``)."""
    import cv2
    from shapely.geometry import MultiPolygon, box as make_box

    from ..overlay import PALETTE
    from ..processing import display_image

    image, factor = source.overview(max_side)
    rgb = display_image(image, modality).astype(np.float32)
    fill = np.zeros(rgb.shape[:2], dtype=np.int32)
    outlines = []
    for k, o in enumerate(result.objects):
        geom = o.geometry if o.geometry is not None else make_box(*o.box)
        polys = geom.geoms if isinstance(geom, MultiPolygon) else [geom]
        for poly in polys:
            ring = np.round(np.asarray(poly.exterior.coords) / factor).astype(np.int32)
            cv2.fillPoly(fill, [ring], k + 1)
            outlines.append((ring, k))
    for k in range(len(result.objects)):
        where = fill == k + 1
        rgb[where] = 0.55 * rgb[where] + 0.45 * PALETTE[k % len(PALETTE)]
    out = np.round(rgb).astype(np.uint8)
    for ring, k in outlines:
        cv2.polylines(out, [ring], True, tuple(int(v) for v in PALETTE[k % len(PALETTE)]), 1)
    path = Path(path)
    if not cv2.imwrite(str(path), out[:, :, ::-1]):
        from ..errors import InputError

        raise InputError(f"cannot write {path}: use a .png path in a writable folder")
    return path
