"""``train(cfg, data, out, resume)``: one Lightning run of a paper variant, from a prepared cache.

RUN_DIR layout::

    config.yaml            the resolved config (also inside every checkpoint)
    run.json               data path and cache fingerprint, versions, start times
    summary.json           status, best metric / epoch, per-epoch history (callbacks.py)
    checkpoints/last.pt    every epoch;  checkpoints/best.pt  on val mean AUC improvement
    logs/csv/version_K/metrics.csv, logs/tensorboard/version_K/   (K = 0, then +1 per resume)

Devices: ``train.accelerator`` / ``devices`` / ``strategy`` / ``num_nodes`` go to the
Lightning Trainer as given (``devices: "2"`` -> 2, ``"0,1"`` -> [0, 1]); ``strategy: ddp``
for several GPUs or nodes (``ddp_spawn`` also works, e.g. 2 CPU processes with gloo);
``precision``: ``auto`` (bf16 where the CPU or GPU runs it fast, else float32 / float16:
:func:`cxrloc.hardware.choose_precision`), ``32-true``, ``bf16-mixed``, ``16-mixed``; the one used
and why are logged and recorded in run.json, summary.json and every checkpoint; ``channels_last``.
Lightning's own sampler injection is off: the data module shards triplets and
validation images itself (see datamodule.py).

Resume (ours: no Lightning ``.ckpt`` files, which need unpickling): ``last.pt`` gives
the weights, Adam and StepLR states, global step and epoch; the Trainer's loop counters
are set to that epoch before ``fit``, so logs, the miner's epoch and the LR schedule go
on where they stopped. With the same config and number of processes the resumed run's
weights equal an uninterrupted run's (the batches of an epoch depend only on
(seed, epoch, rank), and every epoch reseeds its generators from that key).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

import cxrloc
from cxrloc.config import Config, ConfigError, save_config
from cxrloc.data.cache import Cache
from cxrloc.fileio import atomic_write_json, remove_stale_temporaries
from cxrloc.hardware import choose_precision, cpu_capability, training_device
from cxrloc.model.checkpoint import CheckpointError, load_checkpoint
from cxrloc.train.callbacks import (
    METRIC_NAME,
    SUMMARY_FILE,
    RunCheckpoint,
    checkpoint_paths,
    restore_rng_states,
)
from cxrloc.train.datamodule import CacheDataModule
from cxrloc.train.module import DLRVModule

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
CONFIG_FILE = "config.yaml"
PROGRESS_BARS = ("tqdm", "rich", "none")

#: config fields a resumed run may change (they do not change what is learned from which batch,
#: except that a different number of processes changes the shards and max_epochs the length)
RESUME_MAY_CHANGE = frozenset(
    {
        "train.max_epochs", "train.accelerator", "train.devices", "train.strategy", "train.num_nodes",
        "train.precision", "train.channels_last", "train.log_every_n_steps", "train.nonfinite",
        "train.limit_train_batches", "data.num_workers",
    }
)


@dataclass
class TrainResult:
    """Where a run's results are and how it ended.

    ``status``: ``completed``, ``stopped_nonfinite``, ``nothing_to_do`` (resume of a
    finished run), ``interrupted`` or ``failed``.
    """

    run_dir: Path
    status: str
    message: str
    metric_name: str
    best_metric: float | None
    best_epoch: int | None
    epochs_completed: int
    best_checkpoint: Path | None
    last_checkpoint: Path | None
    logs: Path


def train(
    cfg: Config,
    data: str | Path,
    out: str | Path,
    resume: bool = False,
    progress: str = "tqdm",
    callbacks: list[Callback] | None = None,
) -> TrainResult:
    """Train one config on a prepared cache.

    Args:
        cfg: the resolved config (see ``cxrloc config``).
        data: cache folder written by ``cxrloc prepare``.
        out: RUN_DIR; must not hold a run yet unless ``resume``.
        resume: continue RUN_DIR from ``checkpoints/last.pt``; ``cfg`` must equal the
            stored config except for :data:`RESUME_MAY_CHANGE` fields.
        progress: ``tqdm``, ``rich`` (needs the ``rich`` package) or ``none``.
        callbacks: extra Lightning callbacks (tests, profiling).

    Returns:
        :class:`TrainResult` (read back from RUN_DIR/summary.json).

    Raises:
        CacheError: the cache is missing, unfinished or corrupt (checksums verified).
        ConfigError: a bad device spec, or a resume with an incompatible config.
        CheckpointError: ``resume`` without a readable last.pt.
        ValueError: ``out`` already holds a run and ``resume`` is False.
    """
    out, data = Path(out), Path(data)
    if progress not in PROGRESS_BARS:
        raise ValueError(f"progress must be one of {PROGRESS_BARS}, got {progress!r}")
    cache = Cache(data)
    cache.verify()  # a bit-flipped images.npy is refused here, not trained on (seconds per GB)
    last_path, _ = checkpoint_paths(out)
    ckpt: dict[str, Any] | None = None
    summary: dict[str, Any] | None = None
    if resume:
        if not last_path.is_file():
            raise CheckpointError(f"{last_path}: not found; nothing to resume in {out} (start a new run without --resume)")
        ckpt = load_checkpoint(last_path)
        check_resume_config(Config.from_dict(ckpt["config"], source=f"{last_path} (stored config)"), cfg, last_path)
        _check_same_cache(out, cache)
        summary = _read_summary(out, int(ckpt["epoch"]))
        if int(ckpt["epoch"]) >= cfg.train.max_epochs:
            return _result(out, status="nothing_to_do",
                           message=f"{last_path} already holds {ckpt['epoch']} of {cfg.train.max_epochs} epochs")
    elif last_path.exists():
        raise ValueError(f"{out}: already holds a training run ({last_path}); pass --resume to continue it, "
                         "or choose another --out")

    precision = choose_precision(cfg.train.precision, training_device(cfg.train.accelerator))
    log.info("precision %s: %s", precision.used, precision.reason)
    L.seed_everything(cfg.train.seed, workers=True, verbose=False)
    if rank_zero_only.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        for folder in (out, last_path.parent):  # half-written files of a killed run (never read)
            remove_stale_temporaries(folder)
        save_config(cfg, out / CONFIG_FILE)
        _write_run_file(out, data, cache, resumed_from=None if ckpt is None else int(ckpt["epoch"]),
                        precision=precision.to_dict())

    module = DLRVModule(cfg, resume=ckpt)
    checkpointer = RunCheckpoint(out, cfg, summary, precision=precision.to_dict())
    trainer = build_trainer(cfg, out, progress, [*(callbacks or []), checkpointer], precision=precision.used)
    on_gpu = trainer.accelerator.__class__.__name__.startswith("CUDA")
    datamodule = CacheDataModule(cfg, data, pin_memory=on_gpu)
    if ckpt is not None:
        extra = ckpt.get("extra", {})
        restore_loop_position(trainer, int(ckpt["epoch"]), int(extra.get("global_step", 0)))
        if "rng" in extra:
            restore_rng_states(extra["rng"])
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and "grad_scaler" in extra:
            scaler.load_state_dict(extra["grad_scaler"])
        log.info("resuming %s after epoch %d (global step %s)", out, ckpt["epoch"], extra.get("global_step"))
    trainer.fit(module, datamodule=datamodule)
    return _result(out)


def build_trainer(cfg: Config, out: Path, progress: str, callbacks: list[Callback],
                  precision: str | None = None) -> L.Trainer:
    """The Lightning Trainer for ``cfg.train`` with CSV + TensorBoard loggers under RUN_DIR/logs.

    ``precision``: the resolved Lightning precision (default: ``train.precision`` resolved here).
    """
    t = cfg.train
    if precision is None:
        precision = choose_precision(t.precision, training_device(t.accelerator)).used
    logs = out / "logs"
    version = f"version_{_next_version(logs / 'csv')}"
    loggers = [
        CSVLogger(str(logs), name="csv", version=version),
        TensorBoardLogger(str(logs), name="tensorboard", version=version, default_hp_metric=False),
    ]
    all_callbacks = [*callbacks, LearningRateMonitor(logging_interval="epoch")]
    if progress == "rich":
        try:
            from lightning.pytorch.callbacks import RichProgressBar

            all_callbacks.append(RichProgressBar())
        except (ImportError, ModuleNotFoundError) as e:
            raise ValueError("progress bar 'rich' needs the rich package (pip install rich); use 'tqdm'") from e
    elif progress == "tqdm":
        all_callbacks.append(TQDMProgressBar())
    accelerator_is_cpu = t.accelerator == "cpu" or not torch.cuda.is_available()
    return L.Trainer(
        accelerator=t.accelerator,
        devices=parse_devices(t.devices),
        strategy=t.strategy,
        num_nodes=t.num_nodes,
        precision=precision,
        max_epochs=t.max_epochs,
        limit_train_batches=_limit_batches(t.limit_train_batches),
        log_every_n_steps=t.log_every_n_steps,
        logger=loggers,
        callbacks=all_callbacks,
        enable_checkpointing=True,  # RunCheckpoint is the only checkpoint callback
        enable_progress_bar=progress != "none",
        enable_model_summary=progress != "none",
        num_sanity_val_steps=0,
        use_distributed_sampler=False,  # CacheDataModule shards triplets and val images itself
        benchmark=None if accelerator_is_cpu else True,  # cuDNN autotuning on GPU (ours: speed over bitwise repeats)
        default_root_dir=str(out),
    )


def parse_devices(spec: str) -> int | str | list[int]:
    """``"auto"`` -> "auto", ``"2"`` -> 2, ``"0,1"`` -> [0, 1] (Lightning's ``devices``)."""
    s = str(spec).strip()
    try:
        if s == "auto":
            return s
        if "," in s:
            return [int(v) for v in s.split(",") if v.strip()]
        return int(s)
    except ValueError:
        raise ConfigError(f"train.devices = {spec!r}: expected 'auto', a count like '2' or a list like '0,1'") from None


def restore_loop_position(trainer: L.Trainer, epochs_completed: int, global_step: int) -> None:
    """Make a fresh Trainer start at epoch ``epochs_completed`` with ``global_step`` optimizer steps done.

    Sets the fit loop's epoch progress (so ``trainer.current_epoch`` and ``max_epochs``
    count from the true epoch), the optimizer-step counter (``trainer.global_step``) and
    the logging step.
    """
    loop = trainer.fit_loop
    for progress in (loop.epoch_progress.current, loop.epoch_progress.total):
        progress.ready = progress.started = progress.processed = progress.completed = epochs_completed
    step = loop.epoch_loop.automatic_optimization.optim_progress.optimizer.step.total
    step.ready = step.completed = global_step
    loop.epoch_loop._batches_that_stepped = global_step
    if trainer.current_epoch != epochs_completed or trainer.global_step != global_step:
        raise RuntimeError("this Lightning version does not expose the loop counters cxrloc restores on resume")


def check_resume_config(saved: Config, new: Config, where: Path) -> None:
    """Raise ConfigError listing fields that differ between a run's config and the resume's."""
    diffs = [k for k in _diff(saved.to_dict(), new.to_dict()) if k not in RESUME_MAY_CHANGE]
    if diffs:
        raise ConfigError(
            f"{where}: cannot resume with a different config; changed: {', '.join(sorted(diffs))} "
            f"(only {', '.join(sorted(RESUME_MAY_CHANGE))} may change on resume)"
        )


def read_summary(run_dir: str | Path) -> dict[str, Any]:
    """RUN_DIR/summary.json as a dict ({} when absent)."""
    path = Path(run_dir) / SUMMARY_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


# --------------------------------------------------------------------------- internals


def _diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            keys += _diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            keys.append(f"{prefix}{k}")
    return keys


def _limit_batches(value: float) -> int | float | None:
    """train.limit_train_batches: 1.0 -> None (all), > 1 -> that many batches, else a fraction."""
    if value == 1.0:
        return None
    return int(value) if value > 1 else value


def _next_version(folder: Path) -> int:
    if not folder.is_dir():
        return 0
    taken = [int(p.name.split("_", 1)[1]) for p in folder.glob("version_*") if p.name.split("_", 1)[1].isdigit()]
    return max(taken, default=-1) + 1


def _cache_fingerprint(cache: Cache) -> dict[str, Any]:
    files = cache.meta.get("files", {})
    return {name: files.get(name, {}).get("sha256") for name in ("images.npy", "index.csv")}


def _write_run_file(out: Path, data: Path, cache: Cache, resumed_from: int | None,
                    precision: dict[str, Any]) -> None:
    path = out / RUN_FILE
    run = json.loads(path.read_text()) if path.is_file() else {}
    now = datetime.now(UTC).isoformat(timespec="seconds")
    run.setdefault("started", now)
    run["data"] = str(data.resolve())
    run["cache"] = _cache_fingerprint(cache)
    run["versions"] = {"cxrloc": cxrloc.__version__, "torch": torch.__version__, "lightning": L.__version__}
    run["cpu"] = cpu_capability().to_dict()
    run["precision"] = precision  # of this start (a resume may change train.precision)
    if resumed_from is not None:
        run.setdefault("resumes", []).append({"at": now, "after_epoch": resumed_from})
    atomic_write_json(path, run)


def _check_same_cache(out: Path, cache: Cache) -> None:
    path = out / RUN_FILE
    if not path.is_file():
        return
    recorded = json.loads(path.read_text()).get("cache")
    if recorded and recorded != _cache_fingerprint(cache):
        raise ValueError(f"{cache.root}: not the cache this run started with (recorded in {path}); "
                         "resume with the same --data")


def _read_summary(out: Path, epochs_completed: int) -> dict[str, Any]:
    summary = read_summary(out)
    summary["history"] = [h for h in summary.get("history", []) if h.get("epoch", 0) <= epochs_completed]
    best = summary.get("best_epoch")
    if best is not None and best > epochs_completed:  # crashed between summary and checkpoint writes
        summary["best_epoch"] = summary["best_metric"] = None
    return summary


def _result(out: Path, status: str | None = None, message: str | None = None) -> TrainResult:
    summary = read_summary(out)
    best = summary.get("best_checkpoint")
    last = summary.get("last_checkpoint")
    return TrainResult(
        run_dir=out,
        status=status or summary.get("status", "unknown"),
        message=message if message is not None else summary.get("message", ""),
        metric_name=summary.get("metric_name", METRIC_NAME),
        best_metric=summary.get("best_metric"),
        best_epoch=summary.get("best_epoch"),
        epochs_completed=int(summary.get("epochs_completed", 0)),
        best_checkpoint=Path(best) if best else None,
        last_checkpoint=Path(last) if last else None,
        logs=out / "logs",
    )
