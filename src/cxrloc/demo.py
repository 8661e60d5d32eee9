"""``cxrloc demo``: the whole method end to end on synthetic phantoms, in minutes on a laptop CPU.

Stages (each in its own folder under the output folder ``DIR``)::

    DIR/synth/               cxrloc synth: phantoms in the ChestX-ray14 layout (known labels and boxes)
    DIR/cache/               cxrloc prepare: the resized uint8 cache (+ pHash index for mining)
    DIR/train/<variant>/     cxrloc train: config ``demo`` (full DLRV); with --ablation also
                             baseline, dlrv_no_dl and dlrv_no_rv with the same budget
    DIR/evaluate/<variant>/  cxrloc evaluate: AUC with bootstrap CIs, box accuracy at IoU T, reports
    DIR/predict/             cxrloc predict: heatmap overlays of a few test images with boxes
    DIR/report.md, DIR/report.html, DIR/demo.json   the summary (:mod:`cxrloc.demo_report`)

Rerunning with the same arguments reuses every finished stage: a stage writes
``DIR/<stage>/.cxrloc-demo.json`` holding a key (a hash of its inputs: its arguments and
the keys of the stages it reads) when it finishes; a stage whose stamp matches is skipped.
An interrupted training run is resumed from its ``last.pt``; a stage whose inputs changed is
redone from scratch (only the demo's own stage folders are ever removed).

Budgets (ours): ``--quick`` (the end-to-end test) and the default demo are sized by
:data:`PLANS`; the training settings live in the shipped configs ``demo_quick`` and ``demo``.
Threads (ours): on a busy machine two OpenMP threads per process thrash (measured 5x slower
than one thread at load 9 on 2 cores), so :func:`choose_threads` uses one thread per core
that other processes leave free right now (:func:`busy_cores`, from /proc/stat), at least one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Checkpoint

import cxrloc
from cxrloc.config import Config, load_config
from cxrloc.fileio import atomic_write_json
from cxrloc.hardware import machine_description
from cxrloc.labels import BOX_FINDINGS

log = logging.getLogger(__name__)

STAMP = ".cxrloc-demo.json"
SUMMARY_JSON = "demo.json"
#: variant -> (use_dl, use_rv); the order of Tables 1 and 3
VARIANTS: dict[str, tuple[bool, bool]] = {
    "baseline": (False, False),
    "dlrv_no_rv": (True, False),
    "dlrv_no_dl": (False, True),
    "dlrv": (True, True),
}
DIFFICULTIES = ("easy", "medium", "hard")
#: names that only the cxrloc stages write (synth, prepare, train, evaluate, predict): a stage folder
#: holding one of them may be removed and redone
_STAGE_MARKERS = frozenset({STAMP, "images", "synth_meta.json", "Data_Entry_2017.csv", "meta.json", "images.npy",
                            "index.csv", "config.yaml", "checkpoints", "run.json", "predictions.npz", "metrics.json",
                            "predictions.json", "overlays"})


@dataclass(frozen=True)
class DemoPlan:
    """How big one demo is (the training settings are in the shipped config ``config``).

    Attributes:
        name: ``default`` or ``quick``.
        images: synthetic images (about 80 % train_val, 20 % test by patient).
        size: side of the synthetic images and of the cache.
        config: shipped config trained for the full DLRV row (ablation rows derive from it).
        bootstrap: patient-level bootstrap resamples for the AUC CIs.
        bbox_fraction: fraction of the test images with a box finding listed in BBox_List
            (ours: 1.0, every one, so localization accuracy is measured on as many boxes as
            the split has; the real dataset lists 880 of 25,596 test images).
        overlays: test images drawn by ``cxrloc predict`` (one per box finding, in order).
        examples: examples per finding in the evaluation's Figure-3 style panel.
    """

    name: str
    images: int
    size: int
    config: str
    bootstrap: int
    bbox_fraction: float = 1.0
    overlays: int = 8
    examples: int = 2


PLANS: dict[str, DemoPlan] = {
    "default": DemoPlan("default", images=3000, size=128, config="demo", bootstrap=1000),
    "quick": DemoPlan("quick", images=900, size=96, config="demo_quick", bootstrap=200, overlays=4, examples=1),
}


@dataclass
class StageResult:
    """One stage of one demo run: what ran, how long, where its output is."""

    name: str
    folder: Path
    status: str  # "ran", "resumed" or "reused"
    seconds: float  # this invocation
    seconds_original: float  # when the output was made (equal to ``seconds`` unless reused)
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class DemoResult:
    """Everything the summary needs: stages, metrics per variant, files."""

    out: Path
    plan: DemoPlan
    seed: int
    difficulty: str
    threads: int
    load_before: float
    stages: list[StageResult]
    metrics: dict[str, dict[str, Any]]  # variant -> evaluate's metrics.json
    overlays: list[Path]
    seconds: float
    machine: dict[str, Any]

    @property
    def variants(self) -> list[str]:
        return [v for v in VARIANTS if v in self.metrics]


def choose_threads(requested: int | None = None, busy: float | None = None) -> int:
    """Intra-op threads for this process: ``requested``, else the cores other processes leave free (>= 1).

    ``busy`` (cores in use by others) defaults to :func:`busy_cores`, measured now; the 1-minute load
    average is only the fallback, because it lags: right after ``pip install`` it still reads ~1 on
    an idle 2-core machine, and one thread instead of two makes the demo 1.5x slower.
    """
    if requested is not None:
        if requested < 1:
            raise ValueError(f"--threads must be >= 1, got {requested}")
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if busy is None:
        busy = busy_cores()
    return max(1, min(cores, int(cores - busy + 0.5)))


def _cpu_times() -> tuple[float, float] | None:
    """(busy, total) jiffies of all CPUs from /proc/stat, or None where there is none."""
    try:
        fields = [float(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def busy_cores(interval: float = 0.3) -> float:
    """Cores busy right now (all processes, measured over ``interval`` seconds from /proc/stat).

    Falls back to the 1-minute load average where /proc/stat is unavailable (macOS, Windows).
    """
    first = _cpu_times()
    if first is None:
        return _load()
    time.sleep(interval)
    second = _cpu_times()
    if second is None or second[1] <= first[1]:
        return _load()
    cores = os.cpu_count() or 1
    return cores * (second[0] - first[0]) / (second[1] - first[1])


def variant_config(plan: DemoPlan, variant: str, seed: int) -> Config:
    """The demo config for one row of Tables 1/3: the same budget, only the losses differ.

    Same image size, backbone, epochs, learning-rate schedule, batch size (in anchors) and
    seed for every variant; ``loss.use_dl`` / ``loss.use_rv`` switch the terms of eq. 9.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {', '.join(VARIANTS)}")
    use_dl, use_rv = VARIANTS[variant]
    name = plan.config if variant == "dlrv" else f"{plan.config}_{variant}"
    return load_config(plan.config, [f"name={name}", f"loss.use_dl={str(use_dl).lower()}",
                                     f"loss.use_rv={str(use_rv).lower()}", f"train.seed={seed}"])


def run_demo(
    out: str | Path,
    quick: bool = False,
    ablation: bool = False,
    seed: int = 0,
    difficulty: str = "medium",
    threads: int | None = None,
    progress: bool = True,
    say: Callable[[str], None] = log.info,
) -> DemoResult:
    """Run (or reuse) every stage and write the summary report.

    Args:
        out: the demo folder DIR.
        quick: the small plan (end-to-end test, about 2 minutes) instead of the default.
        ablation: also train and evaluate baseline, dlrv_no_dl and dlrv_no_rv.
        seed: synthetic dataset seed, also the training seed.
        difficulty: synthetic difficulty (easy, medium, hard).
        threads: torch intra-op threads (default: :func:`choose_threads`).
        progress: tqdm / Lightning progress bars.
        say: where stage headers and results go (the CLI passes ``print``).

    Returns:
        :class:`DemoResult`; the report is in ``DIR/report.md`` / ``report.html``.
    """
    import torch

    if difficulty not in DIFFICULTIES:
        raise ValueError(f"unknown difficulty {difficulty!r}; choose one of {', '.join(DIFFICULTIES)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plan = PLANS["quick" if quick else "default"]
    load_before = _load()
    busy = busy_cores() if threads is None else None
    threads = choose_threads(threads, busy)
    torch.set_num_threads(threads)
    t_start = time.perf_counter()
    variants = list(VARIANTS) if ablation else ["dlrv"]
    n_stages = 3 + 2 * len(variants)
    say(f"cxrloc demo ({plan.name}): {plan.images} synthetic images of {plan.size} px, difficulty {difficulty}, "
        f"seed {seed}; {', '.join(variants)}; {threads} thread(s)"
        + (f" ({busy:.1f} cores busy at the start)" if busy is not None else " (--threads)") + f"; output {out}")
    runner = _StageRunner(out, n_stages, say)

    synth_key = _key("synth", images=plan.images, size=plan.size, seed=seed, difficulty=difficulty,
                     bbox_fraction=plan.bbox_fraction, version=cxrloc.__version__)
    runner.run("synth", out / "synth", synth_key,
               lambda folder: _synth(folder, plan, seed, difficulty, threads, progress))
    cache_key = _key("prepare", synth=synth_key, size=plan.size)
    runner.run("prepare", out / "cache", cache_key,
               lambda folder: _prepare(out / "synth", folder, plan.size, threads, progress))

    metrics: dict[str, dict[str, Any]] = {}
    train_keys: dict[str, str] = {}
    for variant in variants:
        cfg = variant_config(plan, variant, seed)
        train_key = train_keys[variant] = _key("train", cache=cache_key, config=cfg.to_dict())
        stage = runner.run(f"train {variant}", out / "train" / variant, train_key,
                           lambda folder, cfg=cfg: _train(cfg, out / "cache", folder, progress, say),
                           keep_unfinished=True)
        ckpt = stage.folder / "checkpoints" / "best.pt"
        eval_key = _key("evaluate", train=train_key, bootstrap=plan.bootstrap, examples=plan.examples)
        stage = runner.run(f"evaluate {variant}", out / "evaluate" / variant, eval_key,
                           lambda folder, ckpt=ckpt: _evaluate(ckpt, out / "cache", folder, plan))
        metrics[variant] = json.loads((stage.folder / "metrics.json").read_text())
        _say_metrics(say, variant, metrics[variant])

    dlrv_ckpt = out / "train" / "dlrv" / "checkpoints" / "best.pt"
    map_threshold = cam_threshold_of(metrics["dlrv"])
    picks = overlay_images(out / "cache", out / "synth", plan.overlays)
    predict_key = _key("predict", train=train_keys["dlrv"], images=[p.name for p in picks], map_threshold=map_threshold)
    stage = runner.run("predict", out / "predict", predict_key,
                       lambda folder: _predict(dlrv_ckpt, picks, folder, map_threshold, plan.size))
    doc = json.loads((stage.folder / "predictions.json").read_text())
    overlays = [stage.folder / im["overlay"] for im in doc["images"] if im.get("overlay")]

    result = DemoResult(out=out, plan=plan, seed=seed, difficulty=difficulty, threads=threads, load_before=load_before,
                        stages=runner.results, metrics=metrics, overlays=overlays,
                        seconds=time.perf_counter() - t_start, machine=machine_description())
    from cxrloc.demo_report import write_demo_report

    write_demo_report(result)
    return result


def cam_threshold_of(metrics: dict[str, Any]) -> float:
    """The CAM threshold evaluate chose by cross-validation (median over folds), else its fixed one."""
    loc = metrics.get("localization", {})
    cv = loc.get("cross_validated") if loc.get("available") else None
    if cv and cv.get("chosen_thresholds"):
        values = sorted(cv["chosen_thresholds"])
        return float(values[len(values) // 2])
    return float(loc.get("fixed", {}).get("cam_threshold", 0.5))


def overlay_images(cache_dir: Path, synth_dir: Path, n: int) -> list[Path]:
    """Up to ``n`` test images with a ground-truth box: the first image of each box finding, then the next ones."""
    from cxrloc.data.cache import Cache
    from cxrloc.labels import canonical

    boxes = Cache(cache_dir).boxes
    if len(boxes) == 0:
        return []
    per_finding: dict[str, list[str]] = {f: [] for f in BOX_FINDINGS}
    for image_id, finding in sorted(zip(boxes["image_id"].astype(str), boxes["finding"].astype(str), strict=True)):
        name = canonical(finding)
        if name in per_finding:
            per_finding[name].append(image_id)
    picked: list[str] = []
    for rank in range(max((len(v) for v in per_finding.values()), default=0)):
        for finding in BOX_FINDINGS:
            ids = per_finding[finding]
            if rank < len(ids) and ids[rank] not in picked and len(picked) < n:
                picked.append(ids[rank])
    return [synth_dir / "images" / name for name in picked]


# --------------------------------------------------------------------------- stages


class _StageRunner:
    """Runs or reuses stages, prints a header and a footer per stage, records their times."""

    def __init__(self, out: Path, total: int, say: Callable[[str], None]) -> None:
        self.out, self.total, self.say = out, total, say
        self.results: list[StageResult] = []

    def run(self, name: str, folder: Path, key: str, work: Callable[[Path], dict[str, Any] | None],
            keep_unfinished: bool = False) -> StageResult:
        n = len(self.results) + 1
        stamp = _read_stamp(folder)
        if stamp is not None and stamp.get("key") == key:
            result = StageResult(name, folder, "reused", 0.0, float(stamp.get("seconds", 0.0)), stamp.get("info", {}))
            self.say(f"[{n}/{self.total}] {name}: reusing {folder} (made in {result.seconds_original:.1f} s)")
            self.results.append(result)
            return result
        self.say(f"[{n}/{self.total}] {name} -> {folder}")
        resumed = False
        if folder.exists():
            if keep_unfinished and stamp is None and (folder / "checkpoints" / "last.pt").is_file():
                resumed = True  # the work function decides whether the run can be resumed
            else:
                _remove_stage_folder(folder, self.out)
        if folder.exists():
            (folder / STAMP).unlink(missing_ok=True)
        t0 = time.perf_counter()
        info = work(folder) or {}
        seconds = time.perf_counter() - t0
        status = "resumed" if resumed and info.get("resumed") else "ran"
        atomic_write_json(folder / STAMP, {"key": key, "stage": name, "seconds": seconds, "info": info,
                                           "finished": datetime.now(UTC).isoformat(timespec="seconds")})
        self.say(f"[{n}/{self.total}] {name}: done in {seconds:.1f} s")
        result = StageResult(name, folder, status, seconds, seconds, info)
        self.results.append(result)
        return result


def _synth(folder: Path, plan: DemoPlan, seed: int, difficulty: str, workers: int, progress: bool) -> dict[str, Any]:
    from cxrloc.data.synth.generator import generate_dataset

    res = generate_dataset(folder, plan.images, size=plan.size, seed=seed, difficulty=difficulty, workers=workers,
                           bbox_fraction=plan.bbox_fraction, overwrite=False, progress=progress)
    n_test = sum(j.split == "test" for j in res.jobs)
    return {"images": len(res.jobs), "test_images": n_test, "bbox_rows": res.bbox_rows}


def _prepare(synth_dir: Path, folder: Path, size: int, workers: int, progress: bool) -> dict[str, Any]:
    from cxrloc.data.prepare import prepare_cache

    result = prepare_cache(synth_dir, folder, size=size, workers=workers, progress=progress)
    cache = result.cache
    return {split: int(len(cache.indices(split))) for split in ("train", "val", "test")} | {"boxes": len(cache.boxes)}


def _train(cfg: Config, cache_dir: Path, folder: Path, progress: bool, say: Callable[[str], None]) -> dict[str, Any]:
    from cxrloc.train.engine import CONFIG_FILE, train

    resume = False
    if (folder / "checkpoints" / "last.pt").is_file():
        try:
            saved = load_config(folder / CONFIG_FILE)
            resume = saved.to_dict() == cfg.to_dict()
        except ValueError:
            resume = False
        if not resume:
            _remove_stage_folder(folder, folder.parents[1])
        else:
            say(f"  resuming the interrupted run in {folder}")
    with _quiet_lightning():
        result = train(cfg, cache_dir, folder, resume=resume, progress="tqdm" if progress else "none",
                       callbacks=[_EpochLine(say, cfg.train.max_epochs)])
    if result.status not in ("completed", "nothing_to_do"):
        raise RuntimeError(f"training {cfg.name} in {folder} ended with status {result.status}: {result.message}")
    if result.best_checkpoint is None or not result.best_checkpoint.is_file():
        raise RuntimeError(f"training {cfg.name} in {folder} wrote no best checkpoint")
    from cxrloc.train import read_summary

    return {"resumed": resume, "best_epoch": result.best_epoch, "best_val_auc": result.best_metric,
            "epochs": result.epochs_completed, "precision": read_summary(folder).get("precision", {})}


def _evaluate(ckpt: Path, cache_dir: Path, folder: Path, plan: DemoPlan) -> dict[str, Any]:
    from cxrloc.cli import build_parser

    args = build_parser("evaluate").parse_args([
        "evaluate", "--checkpoint", str(ckpt), "--data", str(cache_dir), "--out", str(folder),
        "--bootstrap", str(plan.bootstrap), "--examples", str(plan.examples),
    ])
    args._run(args)
    return {}


def _predict(ckpt: Path, images: list[Path], folder: Path, map_threshold: float, size: int) -> dict[str, Any]:
    from cxrloc.cli import build_parser

    if not images:
        raise RuntimeError("no test image with a ground-truth box to draw (the synthetic split has none)")
    args = build_parser("predict").parse_args([
        "predict", *map(str, images), "--checkpoint", str(ckpt), "--out", str(folder),
        "--map-threshold", f"{map_threshold:g}", "--decode-size", str(size), "--workers", "1",
    ])
    args._run(args)
    return {"images": len(images), "map_threshold": map_threshold}


def _say_metrics(say: Callable[[str], None], variant: str, m: dict[str, Any]) -> None:
    cls = m["classification"]
    line = f"  {variant}: mean AUC {cls['mean_auc']:.3f} [{cls['mean_ci_low']:.3f}, {cls['mean_ci_high']:.3f}]"
    loc = m.get("localization", {})
    if loc.get("available"):
        mean = (loc.get("cross_validated") or loc["fixed"])["iou"]["Mean"]
        line += "; box accuracy " + " ".join(f"T={t}: {_fmt(mean.get(t))}" for t in ("0.1", "0.3", "0.5", "0.7"))
    say(line)


# --------------------------------------------------------------------------- helpers


def _key(stage: str, **inputs: Any) -> str:
    text = json.dumps({"stage": stage, **inputs}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _read_stamp(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / STAMP).read_text())
    except (OSError, ValueError):
        return None


def _remove_stage_folder(folder: Path, out: Path) -> None:
    """Delete a demo stage folder before redoing it.

    Refuses a folder outside DIR, and one that holds none of the files a cxrloc stage writes
    (so a user's own folder that happens to be called ``DIR/cache`` is never deleted).
    """
    folder, out = folder.resolve(), out.resolve()
    if out not in folder.parents:
        raise RuntimeError(f"refusing to remove {folder}: not inside the demo folder {out}")
    if not folder.exists():
        return
    entries = {p.name for p in folder.iterdir()}
    if entries and not entries & _STAGE_MARKERS:
        raise RuntimeError(f"{folder}: exists and was not written by cxrloc demo; remove it or choose another --out")
    log.info("removing %s (its inputs changed or it is unfinished)", folder)
    shutil.rmtree(folder)


def _load() -> float:
    try:
        return float(os.getloadavg()[0])
    except OSError:
        return 0.0


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}"


@contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Lightning's INFO banners (GPU/TPU availability, tips) are noise in the demo; warnings still show."""
    names = ("lightning.pytorch", "lightning.fabric", "lightning")
    saved = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.WARNING)
    try:
        yield
    finally:
        for n, level in saved.items():
            logging.getLogger(n).setLevel(level)


class _EpochLine(Checkpoint):
    """One line per training epoch: losses, validation mean AUC, seconds per epoch and ETA.

    A :class:`~lightning.pytorch.callbacks.Checkpoint` subclass only so that Lightning calls its
    ``on_train_epoch_end`` after the LightningModule's, when the epoch's means are set; it saves nothing.
    """

    def __init__(self, say: Callable[[str], None], max_epochs: int) -> None:
        self.say, self.max_epochs = say, max_epochs
        self.t0 = time.perf_counter()
        self.first_epoch: int | None = None

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.first_epoch is None:
            self.first_epoch = trainer.current_epoch
            self.t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        done = trainer.current_epoch + 1
        per_epoch = (time.perf_counter() - self.t0) / max(1, done - (self.first_epoch or 0))
        train = getattr(pl_module, "epoch_train", {})
        val = getattr(pl_module, "val_metrics", {})
        nan = float("nan")
        self.say(f"  epoch {done}/{self.max_epochs}: loss {train.get('train_loss', nan):.3f} "
                 f"(bce {train.get('train_bce', nan):.3f}, rv {train.get('train_rv', nan):.3f}, "
                 f"triplet {train.get('train_triplet', nan):.3f}), val mean AUC {val.get('val/auc_mean', nan):.3f}; "
                 f"{per_epoch:.0f} s/epoch, ETA {per_epoch * (self.max_epochs - done):.0f} s")


def plan_dict(plan: DemoPlan) -> dict[str, Any]:
    """The plan as a plain dict (JSON)."""
    return asdict(plan)
