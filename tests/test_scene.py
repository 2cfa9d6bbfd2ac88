"""Whole scenes: tiling, windowed reading, merging across tile borders and georeferenced
output, checked against a scene whose objects are known (a thresholding "model" that finds
exactly the bright pixels of a tile), and the command on the tiny model."""
import json
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import REPO

rasterio = pytest.importorskip("rasterio", reason="the geo extra (rasterio, shapely, pyproj) is not installed")
from affine import Affine  # noqa: E402

from earthgptx.scene.run import SceneOptions, run_scene  # noqa: E402
from earthgptx.scene.source import SceneSource, Window  # noqa: E402
from earthgptx.scene.tiling import merge_boxes, plan_tiles  # noqa: E402

TRANSFORM = Affine(0.5, 0.0, 500000.0, 0.0, -0.5, 4500000.0)  # UTM 33N, 0.5 m pixels


def write_scene(path, data, nodata=None, crs="EPSG:32633"):
    bands = data[None] if data.ndim == 2 else np.moveaxis(data, -1, 0)
    with rasterio.open(path, "w", driver="GTiff", height=data.shape[0], width=data.shape[1], count=bands.shape[0],
                       dtype=data.dtype, crs=crs, transform=TRANSFORM, nodata=nodata, tiled=True,
                       blockxsize=256, blockysize=256) as dst:
        dst.write(bands)
    return path


class Threshold:
    """A stand-in predictor that segments exactly the pixels above 128 of what it is given:
    one mask per request (the union), score 0.9."""

    config = SimpleNamespace(vision=SimpleNamespace(image_size=64))

    def __init__(self):
        self.calls = []

    def predict(self, image, modality, text, prompts=None, task="auto", generation=None, cache=True, **kw):
        self.calls.append((image.shape, task))
        grey = image if image.ndim == 2 else image.max(-1)
        mask = grey > 128
        ys, xs = np.nonzero(mask)
        boxes = np.array([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], float) if len(xs) else np.zeros((0, 4))
        return SimpleNamespace(masks=[mask] if task == "segment" else [], scores=[0.9] * len(boxes), boxes=boxes,
                               text="a scene")


def test_tiles_cover_the_scene_flush_with_its_edges():
    for h, w, tile, overlap in ((1000, 700, 256, 32), (256, 256, 256, 0), (100, 900, 256, 64)):
        windows = plan_tiles(h, w, tile, overlap)
        covered = np.zeros((h, w), bool)
        for win in windows:
            assert win.row + win.height <= h and win.col + win.width <= w
            covered[win.row:win.row + win.height, win.col:win.col + win.width] = True
        assert covered.all()
        cols = sorted({win.col for win in windows})
        assert all(b - a <= tile - overlap for a, b in zip(cols, cols[1:]))
    assert plan_tiles(100, 100, 256, 16) == [Window(0, 0, 100, 100)]
    with pytest.raises(ValueError):
        plan_tiles(100, 100, 64, 64)


def test_windows_read_what_the_file_holds(tmp_path, data_root):
    from earthgptx.imageio import read_image

    chip = read_image(data_root / "sar" / "hrsid" / "P0094_0_800_3000_3800.png").data
    chip = chip if chip.ndim == 2 else chip[..., 0]
    path = write_scene(tmp_path / "s.tif", chip)
    with SceneSource(path) as src:
        assert (src.height, src.width, src.bands, src.georeferenced) == (800, 800, 1, True)
        np.testing.assert_array_equal(src.read(Window(100, 250, 300, 200)), chip[100:400, 250:450])
        overview, factor = src.overview(200)
        assert overview.shape == (200, 200) and factor == 4.0
        assert src.valid(Window(0, 0, 10, 10)).all()


def _known_scene():
    """2,000 x 1,500 px: four bright rectangles, two of them across tile borders (tiles of 512,
    overlap 64), on a dark sea; the bottom-right quarter is no-data (0)."""
    img = np.full((1500, 2000), 40, np.uint8)
    objects = [(100, 100, 160, 130), (430, 300, 520, 340), (900, 440, 950, 600), (1200, 100, 1240, 110)]
    for x0, y0, x1, y1 in objects:
        img[y0:y1, x0:x1] = 220
    img[750:, 1000:] = 0
    return img, objects


def test_objects_cut_by_tile_borders_are_merged_once_and_georeferenced(tmp_path):
    img, objects = _known_scene()
    path = write_scene(tmp_path / "known.tif", img, nodata=0)
    model = Threshold()
    with SceneSource(path) as src:
        result = run_scene(model, src, "sar", "Segment all ships.", "segment", SceneOptions(tile=512, overlap=64))
        from earthgptx.scene.outputs import to_coco, to_geojson

        geo, coco = to_geojson(result, src), to_coco(result, src, "known.tif")
        wgs = to_geojson(result, src, wgs84=True)
        from earthgptx.scene.outputs import write_mask_geotiff, write_overlay

        write_mask_geotiff(tmp_path / "mask.tif", result, src, block=300)
        write_overlay(tmp_path / "overlay.png", result, src, "sar", max_side=1000)
    with rasterio.open(tmp_path / "mask.tif") as m:  # on the scene's grid, a COG with overviews
        assert (m.width, m.height, m.transform, m.crs.to_string()) == (2000, 1500, TRANSFORM, "EPSG:32633")
        assert m.overviews(1) and m.profile["tiled"]
        ids = m.read(1)
    np.testing.assert_array_equal(ids > 0, img == 220)  # exactly the objects' pixels
    assert sorted(np.unique(ids)[1:]) == [1, 2, 3, 4]
    import cv2

    overlay = cv2.imread(str(tmp_path / "overlay.png"))
    assert overlay.shape == (750, 1000, 3) and (overlay[60, 65] != overlay[10, 10]).any()
    assert [o.box for o in result.objects] == [tuple(map(float, b)) for b in sorted(objects, key=lambda b: (b[1], b[0]))]
    assert max(o.tiles for o in result.objects) >= 2  # some object was seen in pieces and merged
    assert result.tiles["skipped_no_data"] >= 1 and result.tiles["answered"] + result.tiles["skipped_no_data"] == \
        result.tiles["planned"]
    assert result.overview == "a scene" and model.calls[0][0] == (96, 128)  # the overview: 2 x input, aspect kept
    # GeoJSON in the scene's CRS: a box's corners through the geotransform
    x0, y0, x1, y1 = result.objects[0].box
    xs, ys = zip(*geo["features"][0]["geometry"]["coordinates"][0])
    assert (min(xs), max(ys)) == (500000 + 0.5 * x0, 4500000 - 0.5 * y0)
    assert (max(xs), min(ys)) == (500000 + 0.5 * x1, 4500000 - 0.5 * y1)
    assert geo["properties"]["crs"] == "EPSG:32633" and len(geo["features"]) == 4
    assert all(f["properties"]["text"] == "a scene" for f in geo["features"])  # the tile's answer
    lon, lat = wgs["features"][0]["geometry"]["coordinates"][0][0]
    assert 14.9 < lon < 15.1 and 40.6 < lat < 40.7  # 500 km E, 4,500 km N in UTM 33N
    assert [a["bbox"] for a in coco["annotations"]][0] == [x0, y0, x1 - x0, y1 - y0]
    assert coco["annotations"][0]["area"] == (x1 - x0) * (y1 - y0)


def test_tiles_default_to_the_model_input_and_bad_overlaps_are_refused(tmp_path):
    from earthgptx.errors import InputError

    img, _ = _known_scene()
    path = write_scene(tmp_path / "known.tif", img[:300, :400])
    with SceneSource(path) as src:
        result = run_scene(Threshold(), src, "sar", "Segment.", "segment", SceneOptions(overlap=16, overview_text=None))
        assert result.tiles["tile_scene_px"] == 64 and result.tiles["planned"] == len(plan_tiles(300, 400, 64, 16))
        with pytest.raises(InputError, match="smaller than the tile"):
            run_scene(Threshold(), src, "sar", "Segment.", "segment", SceneOptions(overlap=64, overview_text=None))


def test_grounding_boxes_are_merged_by_nms(tmp_path):
    img, objects = _known_scene()
    path = write_scene(tmp_path / "known.tif", img)
    with SceneSource(path) as src:
        result = run_scene(Threshold(), src, "sar", "Where are the ships?", "grounding",
                           SceneOptions(tile=700, overlap=200, overview_text=None))
    assert len(result.objects) >= 1 and result.overview is None
    kept = merge_boxes(np.array([[0, 0, 100, 100], [5, 5, 100, 100], [0, 0, 40, 100], [200, 200, 300, 300.]]),
                       np.array([0.9, 0.8, 0.95, 0.5]), properties=[{"text": t} for t in "abcd"])
    assert [o.box for o in kept] == [(0, 0, 40, 100), (0, 0, 100, 100), (200, 200, 300, 300)]
    assert [o.properties["text"] for o in kept] == ["c", "a", "d"]


def test_batched_tiles_give_the_objects_of_one_by_one(tmp_path, tiny_predictor, data_root):
    """``SceneOptions.batch``: tiles answered together (one vision call, decoding stepped
    together) give the objects, scores and texts of tiles answered one at a time."""
    from earthgptx.imageio import read_image

    chip = read_image(data_root / "sar" / "hrsid" / "P0094_0_800_3000_3800.png").data
    path = write_scene(tmp_path / "chip.tif", (chip if chip.ndim == 2 else chip[..., 0])[:500, :700])
    results = []
    for batch in (1, 3):
        with SceneSource(path) as src:
            results.append(run_scene(tiny_predictor, src, "sar", "Segment all ships.", "segment",
                                     SceneOptions(tile=200, overlap=20, overview_text=None, max_new_tokens=3,
                                                  batch=batch)))
    one, three = results
    assert one.tiles == three.tiles and one.tiles["answered"] == 12  # 12 tiles: 4 batches of 3
    assert [(o.box, o.properties) for o in one.objects] == [(o.box, o.properties) for o in three.objects]
    assert [o.score for o in one.objects] == pytest.approx([o.score for o in three.objects], abs=1e-6)
    assert one.objects


def test_egx_scene_on_the_tiny_model(tmp_path, data_root):
    from earthgptx.imageio import read_image

    chip = read_image(data_root / "sar" / "hrsid" / "P0094_0_800_3000_3800.png").data
    chip = chip if chip.ndim == 2 else chip[..., 0]
    scene = np.tile(chip, (2, 2))[:1200, :1500]
    path = write_scene(tmp_path / "big.tif", scene)
    proc = subprocess.run([sys.executable, "-m", "egx", "scene", "--preset", "tiny", "--image", str(path), "--modality",
                           "sar", "--text", "Segment all ships.", "--tile", "400", "--overlap", "50",
                           "--max-new-tokens", "2", "--geojson", str(tmp_path / "o.geojson"), "--wgs84", "--coco",
                           str(tmp_path / "o.json"), "--mask-tif", str(tmp_path / "m.tif"), "--overlay",
                           str(tmp_path / "o.png")], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["tiles"]["planned"] == 4 * 5 and out["objects"] == len(out["boxes_px"])  # rows 0/350/700/800
    assert "tiles 20/20" in proc.stderr
    geo = json.loads((tmp_path / "o.geojson").read_text())
    assert geo["type"] == "FeatureCollection" and geo["properties"]["crs"] == "EPSG:4326"
    assert json.loads((tmp_path / "o.json").read_text())["images"][0]["width"] == 1500
    with rasterio.open(tmp_path / "m.tif") as m:
        assert (m.width, m.height) == (1500, 1200) and int(m.read(1).max()) == out["objects"]
    assert (tmp_path / "o.png").stat().st_size > 0
    bad = subprocess.run([sys.executable, "-m", "egx", "scene", "--preset", "tiny", "--image", str(tmp_path / "no.tif"),
                          "--modality", "sar", "--text", "x"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "not found" in bad.stderr


def test_egx_scene_out_folder_and_zoom_out_tasks(tmp_path, data_root):
    """The issue's contract: ``--out DIR`` writes scene.json, objects.geojson (in the scene's CRS,
    named in a ``crs`` member that OGR reads) and objects.coco.json; ``--task classify`` and
    ``caption`` answer the text on the overview of the whole scene, with no tiles."""
    from earthgptx.imageio import read_image

    chip = read_image(data_root / "sar" / "hrsid" / "P0094_0_800_3000_3800.png").data
    path = write_scene(tmp_path / "s.tif", chip if chip.ndim == 2 else chip[..., 0])
    base = [sys.executable, "-m", "egx", "scene", "--preset", "tiny", "--image", str(path), "--modality", "sar",
            "--max-new-tokens", "2"]
    proc = subprocess.run(base + ["--text", "Where are the ships?", "--task", "grounding", "--tile", "400",
                                  "--overlap", "50", "--out", str(tmp_path / "out")],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    printed = json.loads(proc.stdout)
    scene = json.loads((tmp_path / "out" / "scene.json").read_text())
    assert scene["objects"] == printed["objects"] and scene["tiles"]["planned"] == 9 and "overview" in scene
    geo = json.loads((tmp_path / "out" / "objects.geojson").read_text())
    assert geo["crs"]["properties"]["name"] == "urn:ogc:def:crs:EPSG::32633"
    assert len(geo["features"]) == printed["objects"]
    assert json.loads((tmp_path / "out" / "objects.coco.json").read_text())["images"][0]["width"] == 800
    pyogrio = pytest.importorskip("pyogrio", reason="pyogrio (the geo extra) reads the GeoJSON back")
    info = pyogrio.read_info(tmp_path / "out" / "objects.geojson")
    assert info["crs"] == "EPSG:32633" and info["features"] == printed["objects"]
    for task in ("classify", "caption"):
        proc = subprocess.run(base + ["--text", "What kind of scene is this?", "--task", task, "--out",
                                      str(tmp_path / task)], cwd=REPO, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr
        out = json.loads((tmp_path / task / "scene.json").read_text())
        assert out["task"] == task and out["tiles"]["planned"] == 0 and out["objects"] == 0
        assert isinstance(out["overview"], str)


def test_a_served_scene_equals_the_scene_in_process(tmp_path, tiny_build, data_root):
    """``egx query --scene``: tiles answered by ``egx serve`` four at a time give the objects
    the same engines give in process, and the command prints the same summary."""
    from concurrent.futures import ThreadPoolExecutor

    from earthgptx.imageio import read_image
    from runners.engines import open_predictor
    from runtime.scene_client import ServedPredictor
    from runtime.server import ServeOptions, serve_in_thread

    chip = read_image(data_root / "sar" / "hrsid" / "P0094_0_800_3000_3800.png").data
    chip = chip if chip.ndim == 2 else chip[..., 0]
    path = write_scene(tmp_path / "s.tif", np.tile(chip, (1, 2))[:700, :1300])
    opts = SceneOptions(tile=300, overlap=40, max_new_tokens=2)
    predictor = open_predictor(tiny_build[0], "cpu")
    with SceneSource(path) as src:
        local = run_scene(predictor, src, "sar", "Segment all ships.", "segment", opts)
    # tiles are seen once: none is kept in the image or prompt-prefix caches (only the overview is)
    assert predictor.cache.stats().entries == 1 and predictor.prefix_cache.stats().entries == 1
    with serve_in_thread(ServeOptions(engines=tiny_build[0], bind="tcp://127.0.0.1:*", workers=2, threads=1)) as s:
        served = ServedPredictor(s.opts.bind, 60, 1)
        assert served.config.vision.image_size == 128
        try:
            with SceneSource(path) as src, ThreadPoolExecutor(4) as pool:
                remote = run_scene(served, src, "sar", "Segment all ships.", "segment", opts, executor=pool,
                                   in_flight=4)
        finally:
            served.close()
        proc = subprocess.run([sys.executable, "-m", "egx", "query", "--connect", s.opts.bind, "--scene", "--image",
                               str(path), "--modality", "sar", "--text", "Segment all ships.", "--tile", "300",
                               "--overlap", "40", "--max-new-tokens", "2"], cwd=REPO, capture_output=True, text=True,
                              timeout=300)
    assert remote.tiles == local.tiles and remote.overview == local.overview
    assert [o.box for o in remote.objects] == [o.box for o in local.objects]
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["objects"] == len(local.objects) and out["tiles"]["planned"] == local.tiles["planned"]


def test_a_served_scene_survives_a_worker_restart(tmp_path, tiny_build, data_root):
    """A worker killed while tiles are in flight: its request is retried on the other worker
    (and the replacement takes over), and the scene's objects are those of an undisturbed run."""
    import os
    import signal
    from concurrent.futures import ThreadPoolExecutor

    from earthgptx.imageio import read_image
    from runners.engines import open_predictor
    from runtime.scene_client import ServedPredictor
    from runtime.server import ServeOptions, serve_in_thread

    chip = read_image(data_root / "sar" / "hrsid" / "P0094_0_800_3000_3800.png").data
    chip = chip if chip.ndim == 2 else chip[..., 0]
    path = write_scene(tmp_path / "s.tif", np.tile(chip, (1, 2))[:600, :1400])
    opts = SceneOptions(tile=300, overlap=40, max_new_tokens=2, overview_text=None)
    with SceneSource(path) as src:
        local = run_scene(open_predictor(tiny_build[0], "cpu"), src, "sar", "Segment all ships.", "segment", opts)
    with serve_in_thread(ServeOptions(engines=tiny_build[0], bind="tcp://127.0.0.1:*", workers=2, threads=1)) as s:
        victim = next(iter(s.processes))
        killed = []

        def progress(done: int, total: int) -> None:
            if done == 2 and not killed:
                os.kill(victim, signal.SIGKILL)
                killed.append(victim)

        served = ServedPredictor(s.opts.bind, 30, 2)
        try:
            with SceneSource(path) as src, ThreadPoolExecutor(4) as pool:
                remote = run_scene(served, src, "sar", "Segment all ships.", "segment", opts, progress,
                                   executor=pool, in_flight=4)
        finally:
            served.close()
        assert killed and victim not in s.processes  # it died and was replaced
    assert remote.tiles == local.tiles and [o.box for o in remote.objects] == [o.box for o in local.objects]


def test_scene_benchmark_writes_its_rows(tmp_path):
    out = tmp_path / "scene.json"
    proc = subprocess.run([sys.executable, "benchmarks/scene.py", "--preset", "tiny", "--sizes", "900", "--batch", "1",
                           "4", "--json", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    one, four = json.loads(out.read_text())["rows"]
    assert (one["batch"], four["batch"]) == (1, 4) and one["objects"] == four["objects"]
    for row in (one, four):
        assert row["size"] == 900 and row["tiles"] == len(plan_tiles(900, 900, 512, 64)) == 4
        assert row["tiles_per_s"] > 0 and row["peak_rss_mb"] >= row["rss_before_scene_mb"] > 0
        assert row["median_tile_ms"] > 0 and row["scene_vs_tile_cost"] > 0
    assert "tiles/s" in proc.stdout and "peak RSS" in proc.stdout


@pytest.mark.parametrize("dtype", ["uint16", "complex64"])
def test_16_bit_and_complex_sar_scenes(tmp_path, tiny_predictor, dtype):
    """A 16-bit amplitude and a complex (SLC-like) SAR scene: each tile reaches the model as the
    file holds it (no 8-bit conversion on the way), the zoom-out overview is read from the same
    file, and the real model answers every tile."""
    img, _ = _known_scene()
    rng = np.random.default_rng(5)
    if dtype == "uint16":
        data = img.astype(np.uint16) * 200 + rng.integers(0, 50, img.shape, dtype=np.uint16)
    else:
        phase = rng.uniform(0, 2 * np.pi, img.shape)
        data = (img.astype(np.float32) * np.exp(1j * phase)).astype(np.complex64)
    path = write_scene(tmp_path / f"{dtype}.tif", data)
    seen = []

    class Recording:
        config = tiny_predictor.config

        def predict(self, image, *a, **kw):
            seen.append(image)
            return tiny_predictor.predict(image, *a, **kw)

    with SceneSource(path) as src:
        result = run_scene(Recording(), src, "sar", "Segment all ships.", "segment",
                           SceneOptions(tile=512, overlap=64, max_new_tokens=2, overview_text="Describe the scene."))
        windows = plan_tiles(src.height, src.width, 512, 64)
    assert result.tiles["answered"] == result.tiles["planned"] == len(windows)
    tiles = [t for t in seen if t.shape[:2] == (512, 512)]
    assert tiles and all(t.dtype == np.dtype(dtype) for t in seen)
    assert any(np.array_equal(t, data[:512, :512]) for t in tiles)  # the first tile, as written
    assert isinstance(result.overview, str)  # the zoom-out answer, from the overview


def test_a_scene_too_large_to_read_whole_runs_in_bounded_memory(tmp_path):
    """A 40,000 x 40,000 sparse GeoTIFF (1.5 GB of pixels if read whole; a few blocks written,
    the rest no-data) in 2,048-pixel tiles: every placed object is found once, and the process's
    peak memory grows by a small fraction of the scene (measured in a fresh process)."""
    side, objects = 40_000, [(1000, 1000, 1060, 1030), (1960, 5000, 2020, 5040), (30_000, 38_000, 30_080, 38_020)]
    with rasterio.open(tmp_path / "big.tif", "w", driver="GTiff", height=side, width=side, count=1, dtype="uint8",
                       crs="EPSG:32633", transform=TRANSFORM, nodata=0, tiled=True, blockxsize=512, blockysize=512,
                       sparse_ok=True) as dst:
        from rasterio.windows import Window as RasterWindow

        for x0, y0, x1, y1 in objects:  # a sea of 40 around each object, the rest of the file no-data
            bx, by = x0 // 512 * 512, y0 // 512 * 512
            block = np.full((1024, 1024), 40, np.uint8)
            block[y0 - by:y1 - by, x0 - bx:x1 - bx] = 220
            dst.write(block[None], window=RasterWindow(bx, by, 1024, 1024))
    assert (tmp_path / "big.tif").stat().st_size < 50e6
    script = f"""
import json, resource, sys
sys.path.insert(0, {str(REPO / 'tests')!r})
from test_scene import Threshold
from earthgptx.scene.run import SceneOptions, run_scene
from earthgptx.scene.source import SceneSource
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
with SceneSource({str(tmp_path / 'big.tif')!r}) as src:
    r = run_scene(Threshold(), src, "sar", "Segment all ships.", "segment",
                  SceneOptions(tile=2048, overlap=64, overview_text=None))
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({{"before": before, "after": after, "tiles": r.tiles,
                  "boxes": sorted([round(v) for v in o.box] for o in r.objects)}}))
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["boxes"] == sorted(list(o) for o in objects)
    assert out["tiles"]["planned"] == len(plan_tiles(side, side, 2048, 64)) and out["tiles"]["skipped_no_data"] > 0
    assert out["after"] - out["before"] < 300, out  # MB, against 1,526 MB for the scene read whole
