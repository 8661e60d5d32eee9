"""Predict findings, boxes and heatmaps for image files, folders or DICOMs with a trained checkpoint.

Writes OUT/predictions.json (schema in cxrloc.predict) and OUT/overlays/<name>.png per image.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from cxrloc.evaluate.boxes import BOX_MODES


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", type=Path, metavar="INPUT", help="image files (PNG, JPEG, DICOM, ...) or folders")
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", type=Path, help="checkpoint file (e.g. RUN_DIR/checkpoints/best.pt)")
    model.add_argument("--onnx", type=Path, metavar="EXPORT_DIR",
                       help="a `cxrloc export` folder: run its model.onnx with onnxruntime instead (needs the onnx extra; "
                            "decode size, TTA, thresholds and box mode come from its model.json)")
    p.add_argument("--out", type=Path, default=Path("predictions"), help="output folder (default ./predictions)")
    p.add_argument("--threshold", action="append", default=[], metavar="P or FINDING=P",
                   help="decision threshold on the probability: a number for all findings, or Finding=0.3 (repeatable; default 0.5)")
    p.add_argument("--map-threshold", type=float, default=None,
                   help="CAM threshold for the boxes (default: the checkpoint's eval.map_threshold, 0.5; "
                        "or use a threshold chosen by `cxrloc evaluate`)")
    p.add_argument("--box-mode", choices=BOX_MODES, default=None, help="map -> box (default: the checkpoint's eval.box_mode)")
    p.add_argument("--batch-size", type=int, default=16, help="images per forward pass (default 16)")
    p.add_argument("--workers", type=int, default=2, help="decoding threads, one batch ahead of the network (default 2; 0: decode inline)")
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--decode-size", type=int, default=None, help="decode images to this side first, as `cxrloc prepare` does (default 256)")
    p.add_argument("--no-overlays", action="store_true", help="skip the heatmap overlay PNGs")
    p.add_argument("--save-maps", action="store_true",
                   help="also write maps.npz: every image's 14 eq. 11 maps on the model's grid (image_ids, maps)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="NHWC memory format (default on: faster with oneDNN on CPU)")
    p.add_argument("--hflip-tta", action=argparse.BooleanOptionalAction, default=None,
                   help="also predict the mirrored image and average scores and maps (default: the checkpoint's eval.hflip_tta)")
    p.add_argument("--bf16", action="store_true",
                   help="bfloat16 autocast: faster only on GPUs and CPUs with native bf16 (AMX / AVX512-BF16), several "
                        "times slower on AVX2-only CPUs (a warning says so); may move boxes near the threshold")


def run(args: argparse.Namespace) -> int:
    from cxrloc.predict import collect_inputs, parse_thresholds, predict_files

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    thresholds = parse_thresholds(args.threshold)
    files, errors = collect_inputs(args.inputs)
    for e in errors:
        print(f"warning: {e['file']}: {e['error']}")
    if args.onnx is not None:
        predictor, info = _onnx_predictor(args, thresholds)
    else:
        predictor, info = _torch_predictor(args, thresholds)
    doc = predict_files(predictor, files, args.out, info, batch_size=args.batch_size, workers=args.workers,
                        overlays=not args.no_overlays, errors=errors, save_maps=args.save_maps)
    n_det = sum(len(im["detections"]) for im in doc["images"])
    print(f"{len(doc['images'])} image(s) predicted, {n_det} detection(s), {len(doc['errors'])} error(s)")
    for e in doc["errors"]:
        print(f"  skipped {e['file']}: {e['error']}")
    print(f"wrote {args.out / 'predictions.json'}, {args.out / 'predictions.csv'}"
          + (f", {args.out / 'maps.npz'}" if args.save_maps else ""))
    return 0 if doc["images"] or not doc["errors"] else 1


def _onnx_predictor(args: argparse.Namespace, thresholds: dict[str, float]) -> tuple[Any, dict[str, Any]]:
    from cxrloc.predict import load_onnx_predictor

    fixed = [flag for flag, given in (("--hflip-tta/--no-hflip-tta", args.hflip_tta is not None),
                                      ("--decode-size", args.decode_size is not None), ("--bf16", args.bf16)) if given]
    if fixed:
        raise ValueError(f"--onnx {args.onnx}: {', '.join(fixed)} are fixed by the export (its model.json); "
                         "export again with other settings")
    settings: dict[str, Any] = {"decision_thresholds": thresholds}
    if args.map_threshold is not None:
        settings["map_threshold"] = _check_map_threshold(args.map_threshold)
    if args.box_mode is not None:
        settings["box_mode"] = args.box_mode
    return load_onnx_predictor(args.onnx, **settings)


def _check_map_threshold(value: float) -> float:
    if not 0.0 < value < 1.0:
        raise ValueError(f"--map-threshold must be in (0, 1), got {value}")
    return value


def _torch_predictor(args: argparse.Namespace, thresholds: dict[str, float]) -> tuple[Any, dict[str, Any]]:
    from cxrloc.model.checkpoint import load_model
    from cxrloc.predict import DEFAULT_DECODE_SIZE, Predictor, model_identity

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if args.bf16 and device.type == "cpu":
        from cxrloc.hardware import cpu_capability

        cap = cpu_capability()
        if not cap.native_bf16:
            print(f"warning: --bf16 on a CPU that emulates bfloat16 ({cap.summary()}): expect predict to be several "
                  "times slower than without it")
    model, cfg, ckpt = load_model(args.checkpoint, map_location=device)
    map_threshold = _check_map_threshold(cfg.eval.map_threshold if args.map_threshold is None else args.map_threshold)
    predictor = Predictor(
        model, cfg, decision_thresholds=thresholds, map_threshold=map_threshold,
        box_mode=args.box_mode or cfg.eval.box_mode, decode_size=args.decode_size or DEFAULT_DECODE_SIZE,
        device=device, channels_last=args.channels_last, bf16=args.bf16,
        hflip_tta=cfg.eval.hflip_tta if args.hflip_tta is None else args.hflip_tta,
    )
    return predictor, model_identity(args.checkpoint, cfg, ckpt)
