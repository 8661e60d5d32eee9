"""Predict findings, boxes and heatmaps for image files, folders or DICOMs with a trained checkpoint.

Writes OUT/predictions.json (schema in cxrloc.predict) and OUT/overlays/<name>.png per image.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from cxrloc.evaluate.boxes import BOX_MODES


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", type=Path, metavar="INPUT", help="image files (PNG, JPEG, DICOM, ...) or folders")
    p.add_argument("--checkpoint", required=True, type=Path, help="checkpoint file (e.g. RUN_DIR/checkpoints/best.pt)")
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
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="NHWC memory format (default on: faster with oneDNN on CPU)")
    p.add_argument("--hflip-tta", action=argparse.BooleanOptionalAction, default=None,
                   help="also predict the mirrored image and average scores and maps (default: the checkpoint's eval.hflip_tta)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast (fast on CPUs with AMX / AVX512-BF16 and GPUs)")


def run(args: argparse.Namespace) -> int:
    from cxrloc.model.checkpoint import load_model
    from cxrloc.predict import (
        DEFAULT_DECODE_SIZE,
        Predictor,
        collect_inputs,
        model_identity,
        parse_thresholds,
        predict_files,
    )

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    thresholds = parse_thresholds(args.threshold)
    files, errors = collect_inputs(args.inputs)
    for e in errors:
        print(f"warning: {e['file']}: {e['error']}")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    model, cfg, ckpt = load_model(args.checkpoint, map_location=device)
    map_threshold = cfg.eval.map_threshold if args.map_threshold is None else args.map_threshold
    if not 0.0 < map_threshold < 1.0:
        raise ValueError(f"--map-threshold must be in (0, 1), got {map_threshold}")
    predictor = Predictor(
        model, cfg, decision_thresholds=thresholds, map_threshold=map_threshold,
        box_mode=args.box_mode or cfg.eval.box_mode, decode_size=args.decode_size or DEFAULT_DECODE_SIZE,
        device=device, channels_last=args.channels_last, bf16=args.bf16,
        hflip_tta=cfg.eval.hflip_tta if args.hflip_tta is None else args.hflip_tta,
    )
    doc = predict_files(
        predictor, files, args.out, model_identity(args.checkpoint, cfg, ckpt), batch_size=args.batch_size,
        workers=args.workers, overlays=not args.no_overlays, errors=errors,
    )
    n_det = sum(len(im["detections"]) for im in doc["images"])
    print(f"{len(doc['images'])} image(s) predicted, {n_det} detection(s), {len(doc['errors'])} error(s)")
    for e in doc["errors"]:
        print(f"  skipped {e['file']}: {e['error']}")
    print(f"wrote {args.out / 'predictions.json'}")
    return 0 if doc["images"] or not doc["errors"] else 1
