"""The run's checkpoints and summary: ``last.pt`` every epoch, ``best.pt`` on improvement.

Files in RUN_DIR (written by global rank 0 only, each atomically: temp file + rename):

    checkpoints/last.pt   after every completed epoch
    checkpoints/best.pt   a copy of last.pt whenever the selection metric improved
    summary.json          status, best metric / epoch, per-epoch history

Checkpoints use :func:`cxrloc.model.checkpoint.save_checkpoint` (plain types only,
``torch.load(weights_only=True)``). ``epoch`` is the number of completed epochs and
``metric`` that epoch's selection metric (``val/auc_mean``). ``extra`` holds what a
resume needs, all plain types and tensors:

    optimizer, scheduler   state_dicts (Lightning steps the epoch scheduler after the last
                           training batch, so after E epochs ``last_epoch == E``)
    global_step, epochs_completed, best_metric, best_epoch, metric_name
    sampler                {seed, next_epoch, world_size, anchors_per_rank, train_images}
    rng                    torch / numpy / python / augmentation generator (/ cuda) states as tensors
    grad_scaler            fp16 loss-scaler state (16-mixed only)
    nonfinite_skipped      optimizer steps skipped for a non-finite loss so far
    val                    the epoch's validation results
    precision              {requested, used, device, reason, slow}: the precision it trained in and why

Selection (ours where the paper is silent): the first completed epoch always writes
best.pt; later epochs replace it when ``val/auc_mean`` is strictly greater. A NaN
metric (no val split, or a val split with a single class per finding) never improves
on a finite one. A run stopped for a non-finite loss (``train.nonfinite: stop``)
writes no checkpoint for the interrupted epoch: last.pt stays the last good one.
"""

from __future__ import annotations

import logging
import math
import random
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Checkpoint

from cxrloc.config import Config
from cxrloc.fileio import atomic_open, atomic_write_json
from cxrloc.model.checkpoint import save_checkpoint

log = logging.getLogger(__name__)

METRIC_NAME = "val/auc_mean"
SUMMARY_FILE = "summary.json"


def checkpoint_paths(run_dir: str | Path) -> tuple[Path, Path]:
    """(last.pt, best.pt) of a run folder."""
    folder = Path(run_dir) / "checkpoints"
    return folder / "last.pt", folder / "best.pt"


def rng_states(augment_generator: torch.Generator | None = None) -> dict[str, Any]:
    """The process's RNG states as tensors and ints (safe for ``weights_only`` loading)."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    py_version, py_state, _ = random.getstate()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": int(py_version), "state": torch.tensor(py_state, dtype=torch.int64)},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = list(torch.cuda.get_rng_state_all())
    if augment_generator is not None:
        states["augment"] = augment_generator.get_state()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    """Inverse of :func:`rng_states` for the global generators (torch, numpy, python, cuda)."""
    torch.set_rng_state(states["torch"].cpu())
    n = states["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = states["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), None))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in states["cuda"]])


def _atomic_copy(src: Path, dst: Path) -> None:
    with open(src, "rb") as fin, atomic_open(dst, "wb") as fout:
        shutil.copyfileobj(fin, fout, length=1 << 22)


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


class RunCheckpoint(Checkpoint):
    """Writes last.pt / best.pt / summary.json at the end of every training epoch.

    A :class:`~lightning.pytorch.callbacks.Checkpoint` subclass, so Lightning calls its
    ``on_train_epoch_end`` after the LightningModule's (validation has run by then)
    and adds no default ModelCheckpoint.

    Args:
        run_dir: RUN_DIR.
        cfg: the run's config (stored in every checkpoint).
        summary: the existing summary (on resume), else None.
        precision: the precision this run (or this resumed part of it) uses and why
            (:class:`cxrloc.hardware.PrecisionChoice` as a dict), for summary.json and the checkpoints.
    """

    def __init__(self, run_dir: str | Path, cfg: Config, summary: dict[str, Any] | None = None,
                 precision: dict[str, Any] | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.cfg = cfg
        self.precision = precision or {}
        self.last_path, self.best_path = checkpoint_paths(run_dir)
        summary = summary or {}
        self.history: list[dict[str, Any]] = list(summary.get("history", []))
        self.best_metric: float | None = summary.get("best_metric")
        self.best_epoch: int | None = summary.get("best_epoch")
        self.status = "running"
        self.message = ""

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.status = "running"
        self._write_summary(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if getattr(pl_module, "nonfinite_stop", None):
            self.status, self.message = "stopped_nonfinite", pl_module.nonfinite_stop
            self._write_summary(trainer)
            return
        epochs_done = trainer.current_epoch + 1
        val = dict(getattr(pl_module, "val_metrics", {}))
        metric = val.get(METRIC_NAME, float("nan"))
        improved = self.best_epoch is None or (_finite(metric) and (not _finite(self.best_metric)
                                                                    or metric > self.best_metric))
        if improved:
            self.best_metric, self.best_epoch = float(metric), epochs_done
        record = {"epoch": epochs_done, **getattr(pl_module, "epoch_train", {}),
                  **{k: v for k, v in val.items() if k != "auc_per_finding"}}
        self.history.append(record)
        if trainer.is_global_zero:
            extra = self._extra(trainer, pl_module, epochs_done, val)
            save_checkpoint(self.last_path, pl_module.model, self.cfg, epochs_done, metric, extra)
            if improved:
                _atomic_copy(self.last_path, self.best_path)
            self._write_summary(trainer)
            log.info("epoch %d: %s = %.4f (best %.4f at epoch %s)", epochs_done, METRIC_NAME, metric,
                     self.best_metric if self.best_metric is not None else float("nan"), self.best_epoch)
        trainer.strategy.barrier("cxrloc-checkpoint")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.status == "running":
            self.status = "completed"
        self._write_summary(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.status = "interrupted" if isinstance(exception, KeyboardInterrupt) else "failed"
        self.message = f"{type(exception).__name__}: {exception}"
        self._write_summary(trainer)

    # ------------------------------------------------------------------ internals
    def _extra(self, trainer: L.Trainer, pl_module: L.LightningModule, epochs_done: int,
               val: dict[str, Any]) -> dict[str, Any]:
        optimizer = trainer.optimizers[0]
        scheduler = trainer.lr_scheduler_configs[0].scheduler
        dm = trainer.datamodule
        extra: dict[str, Any] = {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "global_step": int(trainer.global_step),
            "epochs_completed": int(epochs_done),
            "metric_name": METRIC_NAME,
            "best_metric": self.best_metric,
            "best_epoch": self.best_epoch,
            "sampler": {
                "seed": int(self.cfg.train.seed),
                "next_epoch": int(epochs_done),
                "world_size": int(trainer.world_size),
                "anchors_per_rank": int(getattr(dm, "anchors_per_rank", 0)),
                "train_images": int(len(getattr(dm, "train_rows", []))),
            },
            "rng": rng_states(getattr(pl_module, "_augment_generator", None)),
            "nonfinite_skipped": int(getattr(pl_module, "nonfinite_skipped", 0)),
            "val": val,
            "precision": self.precision,
        }
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None:
            extra["grad_scaler"] = scaler.state_dict()
        return extra

    def summary(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "message": self.message,
            "metric_name": METRIC_NAME,
            "best_metric": self.best_metric,
            "best_epoch": self.best_epoch,
            "epochs_completed": self.history[-1]["epoch"] if self.history else 0,
            "max_epochs": self.cfg.train.max_epochs,
            "precision": self.precision,
            "best_checkpoint": str(self.best_path) if self.best_epoch is not None else None,
            "last_checkpoint": str(self.last_path) if self.history else None,
            "updated": datetime.now(UTC).isoformat(timespec="seconds"),
            "history": self.history,
        }

    def _write_summary(self, trainer: L.Trainer) -> None:
        if trainer.is_global_zero:
            atomic_write_json(self.run_dir / SUMMARY_FILE, _json_safe(self.summary()))


def _json_safe(obj: Any) -> Any:
    """NaN / inf -> None so summary.json is strict JSON."""
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
