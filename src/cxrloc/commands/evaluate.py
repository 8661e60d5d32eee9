"""Evaluate a checkpoint on a cache split: AUC with CIs (Table 1) and localization accuracy (Table 2).

Writes to --out: predictions.npz (network outputs, reused on reruns with the same checkpoint
and cache), metrics.json, report.md, report.html, roc_curves.png, localization_accuracy.png and
examples.png. Rerun with other --box-mode / --map-threshold / --bootstrap / --cv-folds to
re-score without running the network again. With --predictions SCORES.csv [--maps MAPS.npz]
instead of --checkpoint, another model's outputs are scored the same way (cxrloc.evaluate.external).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
import yaml

from cxrloc.config import Config, EvalConfig
from cxrloc.evaluate.boxes import BOX_MODES

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    defaults = EvalConfig()
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, help="checkpoint file (e.g. RUN_DIR/checkpoints/best.pt)")
    source.add_argument("--predictions", type=Path, metavar="SCORES.csv",
                        help="another model's scores instead: a CSV with image_id (or Image Index) and the 14 "
                             "findings as columns (format: cxrloc.evaluate.external)")
    p.add_argument("--maps", type=Path, default=None, metavar="MAPS.npz",
                   help="with --predictions: its heatmaps (image_ids, maps (M, 14, h, w)) for the box accuracy")
    p.add_argument("--name", default=None, help="with --predictions: the model's name in reports (default: the file's stem)")
    p.add_argument("--data", required=True, type=Path, help="prepared cache folder")
    p.add_argument("--split", default="test", choices=("train", "val", "test"), help="split to evaluate (default test)")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--box-mode", choices=BOX_MODES, default=None,
                   help=f"map -> box: max_component, all (paper-literal), components (default: config, {defaults.box_mode})")
    p.add_argument("--map-threshold", type=float, default=None,
                   help=f"fixed CAM threshold reported beside the cross-validated one (default: config, {defaults.map_threshold})")
    p.add_argument("--bootstrap", type=int, default=None, help=f"patient-level bootstrap resamples (default: config, {defaults.bootstrap})")
    p.add_argument("--cv-folds", type=int, default=None, help=f"folds for the CAM threshold (default: config, {defaults.cv_folds})")
    p.add_argument("--seed", type=int, default=None, help="seed of the bootstrap, folds and example picks (default: config)")
    p.add_argument("--examples", type=int, default=3, help="examples per finding in examples.png (default 3; 0: none)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="eval.KEY=VALUE",
                   help="override an eval config field, e.g. eval.threshold_grid=[0.3,0.5,0.7] (repeatable)")
    p.add_argument("--recompute", action="store_true", help="run the network even if predictions.npz matches")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="NHWC memory format (default on: same numbers, faster with oneDNN on CPU)")


def run(args: argparse.Namespace) -> int:
    from cxrloc.data.cache import Cache
    from cxrloc.evaluate.report import write_report
    from cxrloc.evaluate.runner import PREDICTIONS_FILE, load_or_run_predictions
    from cxrloc.evaluate.scoring import evaluate_predictions
    from cxrloc.fileio import sha256_file
    from cxrloc.model.checkpoint import load_checkpoint, load_model

    if args.predictions is not None:
        return _run_external(args)
    if args.maps is not None or args.name is not None:
        raise ValueError("--maps and --name go with --predictions (a checkpoint makes its own maps)")
    device = _device(args.device)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    ckpt = load_checkpoint(args.checkpoint)  # verifies the file before anything runs
    stored = ckpt["config"]
    eval_cfg = _eval_config(stored, args)
    cache = Cache(args.data)
    cache.verify()  # checksums of every cache file: a corrupt cache is refused, never scored
    identity = {
        "checkpoint": {
            "path": str(args.checkpoint),
            "sha256": sha256_file(args.checkpoint),
            "config_name": stored.get("name"),
            "epoch": ckpt.get("epoch"),
            "metric": ckpt.get("metric"),
        },
        "data": {"cache": str(args.data), "split": args.split},
    }

    def model_loader():
        model, cfg, _ = load_model(args.checkpoint, map_location=device)
        return model, cfg.data

    args.out.mkdir(parents=True, exist_ok=True)
    preds, reused = load_or_run_predictions(
        args.out / PREDICTIONS_FILE, model_loader, cache, args.split,
        {"checkpoint": identity["checkpoint"]}, recompute=args.recompute,
        batch_size=args.batch_size, device=device, channels_last=args.channels_last, hflip_tta=eval_cfg.hflip_tta,
    )
    evaluation = evaluate_predictions(preds, cache.boxes, eval_cfg)
    config = dict(stored)
    config["eval"] = _eval_dict(eval_cfg)
    paths = write_report(
        args.out, evaluation, preds, identity, config,
        image_loader=(lambda image_id: cache.images[cache.row(image_id)]) if args.examples > 0 else None,
        examples_per_finding=args.examples, seed=eval_cfg.seed,
    )
    print(f"{'reused' if reused else 'computed'} predictions for {evaluation.metrics['num_images']} images ({args.split})")
    _print_summary(evaluation.metrics, paths)
    return 0


def _run_external(args: argparse.Namespace) -> int:
    """Score another model's predictions file (see cxrloc.evaluate.external) on the cache split."""
    from cxrloc.data.cache import Cache
    from cxrloc.evaluate.external import external_predictions
    from cxrloc.evaluate.report import write_report
    from cxrloc.evaluate.runner import PREDICTIONS_FILE
    from cxrloc.evaluate.scoring import evaluate_predictions

    eval_cfg = _eval_config({}, args)
    cache = Cache(args.data)
    cache.verify()
    preds = external_predictions(args.predictions, cache, args.split, args.maps, args.name)
    ext = preds.meta["external"]
    evaluation = evaluate_predictions(preds, cache.boxes, eval_cfg)
    args.out.mkdir(parents=True, exist_ok=True)
    preds.save(args.out / PREDICTIONS_FILE)  # what `cxrloc compare` reads
    identity = {"predictions": ext, "data": {"cache": str(args.data), "split": args.split}}
    config = {"name": ext["name"], "external": True, "eval": _eval_dict(eval_cfg)}
    paths = write_report(
        args.out, evaluation, preds, identity, config,
        image_loader=(lambda image_id: cache.images[cache.row(image_id)]) if args.examples > 0 and ext["maps"] else None,
        examples_per_finding=args.examples, seed=eval_cfg.seed,
    )
    print(f"scored {ext['name']} ({args.predictions}) on {evaluation.metrics['num_images']} {args.split} images"
          + (f"; ignored columns: {', '.join(ext['ignored_columns'])}" if ext["ignored_columns"] else ""))
    _print_summary(evaluation.metrics, paths)
    return 0


def _print_summary(m: dict, paths: dict) -> None:
    cls = m["classification"]
    print(f"mean AUC {cls['mean_auc']:.4f} [{_fmt(cls['mean_ci_low'])}, {_fmt(cls['mean_ci_high'])}]")
    loc = m["localization"]
    if loc.get("available"):
        table = (loc.get("cross_validated") or loc["fixed"])["iou"]["Mean"]
        kind = "CV threshold" if loc.get("cross_validated") else f"CAM threshold {loc['fixed']['cam_threshold']:g}"
        print(f"localization ({loc['num_boxes']} boxes, {kind}): " + "  ".join(f"T={t}: {_fmt(v)}" for t, v in table.items()))
    else:
        print(f"localization: not computed ({loc.get('reason')})")
    print(f"report: {paths['report_md']}")


def _eval_config(stored: dict, args: argparse.Namespace) -> EvalConfig:
    """The checkpoint's eval section, then --set eval.* overrides, then the explicit flags."""
    data = dict(stored.get("eval", {}))
    for item in args.overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.startswith("eval.") or key.count(".") != 1:
            raise ValueError(f"--set {item!r}: expected eval.KEY=VALUE (only eval fields change at evaluation time)")
        data[key.removeprefix("eval.")] = yaml.safe_load(raw)
    for flag in ("box_mode", "map_threshold", "bootstrap", "cv_folds", "seed"):
        value = getattr(args, flag)
        if value is not None:
            data[flag] = value
    cfg = Config.from_dict({"eval": data}, source="evaluate options")
    if cfg.eval.bootstrap < 0:
        raise ValueError(f"--bootstrap must be >= 0, got {cfg.eval.bootstrap}")
    return cfg.eval


def _eval_dict(e: EvalConfig) -> dict:
    from dataclasses import asdict

    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(e).items()}


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"
