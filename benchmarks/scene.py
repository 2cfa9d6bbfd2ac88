"""Whole-scene benchmark: tiles/s and peak memory of ``egx scene``'s loop (``earthgptx.scene``)
on synthetic GeoTIFFs of N x N pixels, each size in a fresh process so that its peak RSS is
its own. Prints a table and writes JSON with ``--json``.

    python benchmarks/scene.py --preset tiny --sizes 10000 20000 --json scene.json

The scene is written window by window (deflate-compressed, tiled GeoTIFF; a sea of speckle
with bright ship-like rectangles), so making it never holds it either. What the numbers mean:
``peak_rss_mb`` is the process's high-water mark (model and runtime included);
``scene_raw_mb`` what the scene would take read whole: the loop's memory follows the tile
and the objects found (their polygons: ``pieces``, ``polygon_vertices``), not the scene.
``scene_vs_tile_cost``: wall seconds per tile over the median tile call (``predict``, or the
request when served with tiles in flight, where calls overlap and the ratio is below 1): what
reading, tiling and merging add to the model's own cost."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BLOCK = 1024


def write_synthetic(path: Path, size: int, seed: int = 0) -> Path:
    import rasterio
    from affine import Affine
    from rasterio.windows import Window

    rng = np.random.default_rng(seed)
    profile = {"driver": "GTiff", "height": size, "width": size, "count": 1, "dtype": "uint8", "crs": "EPSG:32633",
               "transform": Affine(1.0, 0, 500000.0, 0, -1.0, 4500000.0), "tiled": True, "blockxsize": 256,
               "blockysize": 256, "compress": "deflate"}
    with rasterio.open(path, "w", **profile) as dst:
        for r in range(0, size, BLOCK):
            for c in range(0, size, BLOCK):
                h, w = min(BLOCK, size - r), min(BLOCK, size - c)
                block = rng.gamma(2.0, 15.0, (h, w)).clip(0, 255).astype(np.uint8)
                for _ in range(3):
                    y, x = rng.integers(0, max(1, h - 40)), rng.integers(0, max(1, w - 12))
                    block[y:y + 30, x:x + 8] = 230
                dst.write(block[None], window=Window(c, r, w, h))
    return path


def peak_rss_mb(pid: int | str = "self") -> float:
    """A process's high-water mark of resident memory (``VmHWM``), MB."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def one(args) -> dict:
    """One scene of ``args.one`` pixels a side, in process (``args.engines`` or the PyTorch
    preset) or, with ``args.served``, through ``egx serve`` on ``args.engines`` (2 workers,
    4 tiles in flight)."""
    from contextlib import ExitStack

    from earthgptx.checkpoint import load_reference
    from earthgptx.predictor import Predictor
    from earthgptx.scene.run import SceneOptions, run_scene
    from earthgptx.scene.source import SceneSource

    latencies: list[float] = []  # per tile: the predict call (in process) or the request (served)

    class Timed:
        def __init__(self, inner) -> None:
            self.inner, self.config = inner, inner.config

        def predict(self, *a, **kw):
            t = time.perf_counter()
            out = self.inner.predict(*a, **kw)
            latencies.append((time.perf_counter() - t) * 1e3)  # list.append is atomic: threads may share it
            return out

        def predict_many(self, images, *a, **kw):  # SceneOptions.batch > 1: a tile's share of the batch
            t = time.perf_counter()
            out = self.inner.predict_many(images, *a, **kw)
            latencies.extend([(time.perf_counter() - t) * 1e3 / len(images)] * len(images))
            return out

    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        path = write_synthetic(Path(tmp) / "scene.tif", args.one)
        executor, workers = None, []
        if args.served:
            from concurrent.futures import ThreadPoolExecutor

            from runtime.scene_client import ServedPredictor
            from runtime.server import ServeOptions, serve_in_thread

            server = stack.enter_context(serve_in_thread(ServeOptions(engines=Path(args.engines), workers=2, threads=1,
                                                                      bind="tcp://127.0.0.1:*")))
            workers = list(server.processes)
            predictor = ServedPredictor(server.opts.bind, 120, 2)
            stack.callback(predictor.close)
            executor = stack.enter_context(ThreadPoolExecutor(4))
        elif args.engines:
            from runners.engines import open_predictor

            predictor = open_predictor(args.engines, "cpu")
        else:
            predictor = Predictor.from_model(*load_reference(None if args.preset == "default" else args.preset, None))
        before = peak_rss_mb()
        with SceneSource(path) as src:
            start = time.perf_counter()
            result = run_scene(Timed(predictor), src, "sar", "Segment all ships.", "segment",
                               SceneOptions(tile=args.tile, overlap=args.overlap, max_new_tokens=2, overview_text=None,
                                            batch=args.batch),
                               executor=executor, in_flight=4)
            seconds = time.perf_counter() - start
        worker_peaks = [peak_rss_mb(pid) for pid in workers]
    vertices = sum(len(o.geometry.exterior.coords) if o.geometry.geom_type == "Polygon" else
                   sum(len(g.exterior.coords) for g in o.geometry.geoms) for o in result.objects)
    return {"size": args.one, "tile": args.tile, "batch": args.batch, "tiles": result.tiles["planned"],
            "seconds": round(seconds, 1),
            "pieces": result.tiles["pieces"], "polygon_vertices": vertices,
            "tiles_per_s": round(result.tiles["answered"] / seconds, 3), "objects": len(result.objects),
            "tile_ms": latencies, "peak_rss_mb": round(peak_rss_mb(), 1), "rss_before_scene_mb": round(before, 1),
            "worker_peak_rss_mb": [round(w, 1) for w in worker_peaks], "scene_raw_mb": round(args.one ** 2 / 2**20, 1)}


def measure(size: int, preset: str, engines: str | None, served: bool, tile: int = 512, overlap: int = 64,
            batch: int = 1) -> dict:
    """``one`` in a fresh process (so its peak RSS is its own)."""
    cmd = [sys.executable, __file__, "--preset", preset, "--tile", str(tile), "--overlap", str(overlap),
           "--batch", str(batch), "--one", str(size)]
    cmd += (["--engines", str(engines)] if engines else []) + (["--served"] if served else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(prog="scene.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny", choices=("default", "tiny", "small", "edge"),
                   help="the PyTorch model without --engines (default: tiny; 'default' is the shipped trained model)")
    p.add_argument("--engines", help="a build folder instead of the PyTorch preset")
    p.add_argument("--served", action="store_true",
                   help="through egx serve on --engines (2 workers, 4 tiles in flight)")
    p.add_argument("--sizes", type=int, nargs="+", default=[10000, 20000])
    p.add_argument("--tile", type=int, default=512)
    p.add_argument("--overlap", type=int, default=64)
    p.add_argument("--batch", type=int, nargs="+", default=[1],
                   help="tiles answered together in process (egx scene --batch); one row per value")
    p.add_argument("--json", help="write the rows here")
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        args.batch = args.batch[0]
        print(json.dumps(one(args)))
        return 0
    if args.served and args.batch != [1]:
        p.error("--batch is for scenes in process; --served pipelines tiles to the workers instead")
    rows = []
    for size, batch in ((s, b) for s in args.sizes for b in args.batch):
        try:
            r = measure(size, args.preset, args.engines, args.served, args.tile, args.overlap, batch)
        except RuntimeError as exc:
            print(exc, file=sys.stderr)
            return 1
        tile_ms = r.pop("tile_ms")
        # the loop's cost over the model's: wall time per tile against the median tile call
        r["median_tile_ms"] = round(float(np.median(tile_ms)), 2) if tile_ms else None
        r["scene_vs_tile_cost"] = round(1e3 * r["seconds"] / r["tiles"] / r["median_tile_ms"], 3) if tile_ms else None
        rows.append(r)
        print(f"{r['size']:>6} px  batch {r['batch']}  {r['tiles']:>5} tiles  {r['tiles_per_s']:7.2f} tiles/s  "
              f"{r['seconds']:8.1f} s  tile call {r['median_tile_ms']} ms (scene/tile cost {r['scene_vs_tile_cost']})  "
              f"peak RSS {r['peak_rss_mb']:7.1f} MB (before the scene {r['rss_before_scene_mb']:.1f}"
              + (f"; workers {r['worker_peak_rss_mb']}" if r["worker_peak_rss_mb"] else "") + ")  "
              f"scene read whole {r['scene_raw_mb']:.0f} MB  {r['objects']} objects from {r['pieces']} pieces, "
              f"{r['polygon_vertices']} vertices", flush=True)
    if args.json:
        backend = ("zmq " if args.served else "") + (args.engines or f"pytorch {args.preset}")
        Path(args.json).write_text(json.dumps({"backend": backend, "rows": rows},
                                              indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
