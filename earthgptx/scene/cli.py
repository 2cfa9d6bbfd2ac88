"""``egx scene``: the command line over ``run.run_scene`` (the dispatcher adds the model source)."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ..processing import MODALITIES


def add_scene_arguments(p: argparse.ArgumentParser) -> None:
    """``egx scene``: the request and the tiling."""
    p.add_argument("--image", required=True, help="the scene: GeoTIFF, COG or any GDAL format (PNG/TIFF too)")
    p.add_argument("--modality", required=True, choices=MODALITIES)
    p.add_argument("--text", required=True, help="what to find in every tile, e.g. \"Segment all ships.\"")
    p.add_argument("--task", choices=("segment", "grounding", "caption", "classify"), default="segment",
                   help="per tile: masks (merged as polygons) or boxes (merged by NMS); caption or classify: "
                        "the text answered on an overview of the whole scene (zoom out, no tiles)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--overlay", metavar="OUT.png", help="the scene decimated to 2,048 px with the objects drawn")
    p.add_argument("--batch", type=int, default=1, metavar="N",
                   help="tiles answered together: one vision-encoder call and their decoding stepped together "
                        "(the same answers; N tiles in memory; for TensorRT at most the build's --max-batch)")
    add_tiling_arguments(p)


def add_tiling_arguments(p: argparse.ArgumentParser) -> None:
    """The scene options ``egx scene`` and ``egx query --scene`` share (``--overlay`` comes
    with each command's own arguments)."""
    p.add_argument("--tile", type=int, default=None,
                   help="tile side in pixels (default: the model's input side, so tiles are not scaled down)")
    p.add_argument("--overlap", type=int, default=64, help="pixels neighbouring tiles share (>= the largest object)")
    p.add_argument("--gsd", type=float, default=None, metavar="M",
                   help="resample tiles to this ground-sample distance (CRS units a pixel; GeoTIFFs only)")
    p.add_argument("--overview-text", default="Describe this image.",
                   help="the zoom-out question, answered on an overview of the whole scene")
    p.add_argument("--no-overview", action="store_true", help="skip the zoom-out answer")
    p.add_argument("--geojson", metavar="OUT.geojson", help="objects as GeoJSON (the scene's CRS; --wgs84: EPSG:4326)")
    p.add_argument("--wgs84", action="store_true", help="GeoJSON in longitude/latitude (EPSG:4326)")
    p.add_argument("--simplify", type=float, default=0.5, help="GeoJSON polygon tolerance in scene pixels")
    p.add_argument("--coco", metavar="OUT.json", help="objects as COCO JSON in scene pixels")
    p.add_argument("--mask-tif", metavar="OUT.tif", help="objects rasterised on the scene's grid (uint16 ids, a COG)")
    p.add_argument("--out", metavar="DIR", help="write DIR/scene.json (the summary printed), DIR/objects.geojson "
                                                "and DIR/objects.coco.json (as --geojson and --coco)")


class _Progress:
    """Tiles done, rate and ETA on stderr: one updating line on a terminal, else a line per 10 %."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.tty = sys.stderr.isatty()
        self.last = -1

    def __call__(self, done: int, total: int) -> None:
        t = time.monotonic() - self.start
        rate = done / t if t > 0 else 0.0
        eta = (total - done) / rate if rate > 0 else 0.0
        line = f"tiles {done}/{total}  {rate:.2f} tiles/s  ETA {eta:.0f} s"
        if self.tty:
            print("\r" + line, end="\n" if done == total else "", file=sys.stderr, flush=True)
        elif done * 10 // total != self.last or done == total:
            self.last = done * 10 // total
            print(line, file=sys.stderr, flush=True)


def scene_options(args: argparse.Namespace):
    from .run import SceneOptions

    return SceneOptions(tile=args.tile, overlap=args.overlap, gsd=args.gsd,
                        overview_text=None if args.no_overview else args.overview_text,
                        max_new_tokens=args.max_new_tokens,
                        batch=getattr(args, "batch", 1))  # egx query --scene pipelines tiles instead


def answer_scene(args: argparse.Namespace, predictor, executor=None, in_flight: int = 4) -> int:
    """Run the scene of ``args`` through ``predictor``, write ``--geojson``/``--coco``, print
    the JSON summary (the shared end of ``egx scene`` and ``egx query --scene``)."""
    from .outputs import to_coco, to_geojson, write_json, write_mask_geotiff, write_overlay
    from .run import run_scene
    from .source import SceneSource

    with SceneSource(args.image) as source:
        print(f"scene {source.width}x{source.height} px, {source.bands} band(s) {source.dtype}, "
              f"{source.crs.to_string() if source.crs else 'no CRS'}", file=sys.stderr)
        result = run_scene(predictor, source, args.modality, args.text, args.task, scene_options(args), _Progress(),
                           executor=executor, in_flight=in_flight)
        summary = {"task": result.task, "objects": len(result.objects), "overview": result.overview,
                   "tiles": result.tiles, "seconds": round(result.seconds, 2),
                   "boxes_px": [[round(v, 2) for v in o.box] for o in result.objects],
                   "scores": [round(o.score, 4) for o in result.objects]}
        out = Path(args.out) if args.out else None
        geojson = args.geojson or (out / "objects.geojson" if out else None)
        coco = args.coco or (out / "objects.coco.json" if out else None)
        if geojson:
            summary["geojson"] = str(write_json(geojson, to_geojson(result, source, args.wgs84, args.simplify)))
        if coco:
            summary["coco"] = str(write_json(coco, to_coco(result, source, Path(args.image).name)))
        if args.mask_tif:
            summary["mask_tif"] = str(write_mask_geotiff(args.mask_tif, result, source))
        if args.overlay:
            summary["overlay"] = str(write_overlay(args.overlay, result, source, args.modality))
        if out:
            summary["scene_json"] = str(write_json(out / "scene.json", summary))
    print(json.dumps(summary))
    return 0


def cmd_scene(args: argparse.Namespace, open_predictor) -> int:
    from .source import SceneSource

    SceneSource(args.image).close()  # a missing or unreadable scene is said before the model loads
    return answer_scene(args, open_predictor(args))
