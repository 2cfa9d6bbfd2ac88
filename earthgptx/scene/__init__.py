"""Whole scenes (``egx scene``): zoom out (a scene-level answer from an overview) and zoom in
(grounding / segmentation on overlapping tiles at the model's resolution), read window by
window so that the full-resolution scene is never in memory, with objects cut by tile
borders merged once and answers in the scene's coordinates (GeoJSON in its CRS or EPSG:4326,
COCO in pixels).

``source.SceneSource`` reads (rasterio: GeoTIFF, COG, any GDAL format, PNG/TIFF too);
``tiling`` plans windows and merges per-tile objects; ``run.run_scene`` drives a
``Predictor``; ``outputs`` writes GeoJSON and COCO. Needs the ``geo`` extra
(``pip install -e ".[geo]"``: rasterio, shapely, pyproj)."""
