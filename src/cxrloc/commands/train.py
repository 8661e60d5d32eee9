"""Train a paper variant on a prepared cache: checkpoints, logs and a summary in RUN_DIR.

Examples:
    cxrloc train --config dlrv --data CACHE --out runs/dlrv
    cxrloc train --config baseline --data CACHE --out runs/base --set train.max_epochs=5 --seed 1
    cxrloc train --resume runs/dlrv                      # continue from runs/dlrv/checkpoints/last.pt
    cxrloc train --config dlrv --data CACHE --out runs/dlrv --resume --set train.max_epochs=40
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cxrloc.config import ConfigError, available_configs, load_config
from cxrloc.train.engine import CONFIG_FILE, PROGRESS_BARS, RUN_FILE, train


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None,
                   help=f"shipped name ({', '.join(available_configs())}) or YAML path; on --resume default: "
                        "the run's config.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. train.max_epochs=5 (repeatable)")
    p.add_argument("--data", default=None, help="prepared cache folder (cxrloc prepare); on --resume default: "
                                                "the run's")
    p.add_argument("--out", default=None, help="run folder (RUN_DIR) for config, checkpoints, logs")
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="RUN_DIR",
                   help="continue a run from RUN_DIR/checkpoints/last.pt (RUN_DIR defaults to --out)")
    p.add_argument("--seed", type=int, default=None, help="seed for everything (sets train.seed)")
    p.add_argument("--progress", choices=PROGRESS_BARS, default="tqdm", help="progress bar (default: tqdm)")


def run(args: argparse.Namespace) -> int:
    overrides = list(args.overrides) + ([f"train.seed={args.seed}"] if args.seed is not None else [])
    if args.resume:
        run_dir = Path(args.resume if isinstance(args.resume, str) else (args.out or ""))
        if not str(run_dir):
            raise ConfigError("--resume needs the run folder: --resume RUN_DIR (or --out RUN_DIR --resume)")
        if args.out and Path(args.out).resolve() != run_dir.resolve():
            raise ConfigError(f"--resume {run_dir} and --out {args.out} name different run folders")
        if args.config is None and not (run_dir / CONFIG_FILE).is_file():
            raise ConfigError(f"{run_dir / CONFIG_FILE}: not found; is {run_dir} a cxrloc run folder?")
        cfg = load_config(args.config or run_dir / CONFIG_FILE, overrides)
        data = args.data or _recorded_data(run_dir)
    else:
        if args.config is None or args.data is None or args.out is None:
            missing = [f for f, v in (("--config", args.config), ("--data", args.data), ("--out", args.out)) if v is None]
            raise ConfigError(f"a new run needs {', '.join(missing)} (or --resume RUN_DIR to continue one)")
        cfg = load_config(args.config, overrides)
        run_dir, data = Path(args.out), args.data
    result = train(cfg, data, run_dir, resume=bool(args.resume), progress=args.progress)
    if not _is_rank_zero():
        return 0
    print(f"run folder:      {result.run_dir}")
    print(f"status:          {result.status}" + (f" ({result.message})" if result.message else ""))
    print(f"epochs:          {result.epochs_completed} of {cfg.train.max_epochs}")
    if result.best_epoch is not None:
        metric = "nan" if result.best_metric is None else f"{result.best_metric:.4f}"
        print(f"best {result.metric_name}: {metric} at epoch {result.best_epoch}")
    print(f"best checkpoint: {result.best_checkpoint}")
    print(f"last checkpoint: {result.last_checkpoint}")
    print(f"logs:            {result.logs} (CSV + TensorBoard), summary: {result.run_dir / 'summary.json'}")
    if result.status not in ("completed", "nothing_to_do"):
        print(f"cxrloc train: {result.status}: {result.message}", file=sys.stderr)
        return 1
    return 0


def _recorded_data(run_dir: Path) -> str:
    path = run_dir / RUN_FILE
    if path.is_file():
        data = json.loads(path.read_text()).get("data")
        if data:
            return data
    raise ConfigError(f"{path}: no recorded cache folder; pass --data CACHE")


def _is_rank_zero() -> bool:
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return rank_zero_only.rank == 0
