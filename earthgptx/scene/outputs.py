"""A scene's answer as files: GeoJSON (the scene's CRS, or EPSG:4326) and COCO (pixels)."""
from __future__ import annotations

import json
from pathlib import Path

from .run import SceneResult
from .source import SceneSource


def to_geojson(result: SceneResult, source: SceneSource, wgs84: bool = False, tolerance: float = 0.5) -> dict:
    """A FeatureCollection: one feature per object, its mask polygon (or box) in the scene's
    CRS (``wgs84``: EPSG:4326 longitude/latitude through pyproj), simplified by ``tolerance``
    scene pixels; properties ``score``, ``box_px`` (XYXY scene pixels), ``tiles``. Without
    georeferencing the coordinates are scene pixels and the collection says so."""
    import numpy as np
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
    return {"type": "FeatureCollection", "features": features,
            "properties": {"crs": crs if source.georeferenced else "pixels", "task": result.task,
                           "overview": result.overview, "tiles": result.tiles}}


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
