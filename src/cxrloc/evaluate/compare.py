"""Evaluated runs side by side: the paper's Table 1 and Table 3 layouts, and paired differences.

``cxrloc compare EVAL_DIR... --out DIR`` reads what ``cxrloc evaluate`` wrote in each folder
(``metrics.json``, ``predictions.npz``) and writes ``DIR/compare.md``, ``compare.html``,
``compare.json`` and ``differences.png`` (rendered by :mod:`cxrloc.evaluate.compare_report`):

- Table 1 layout: AUC per finding, the mean and its 95% CI, one row per run, then the paper's
  row of each variant present where the paper has one;
- Table 3 layout: mean box accuracy at IoU > T (T = 0.1 ... 0.7), each run with its own CAM
  threshold (cross-validated when ``evaluate`` could cross-validate it, as its report shows);
- every run minus the reference run (default: the full DLRV when exactly one run is, else the
  first run) in mean AUC, in mean box accuracy at T = 0.1 / 0.3 / 0.5 / 0.7 and in AUC per
  finding, each with a paired bootstrap 95% interval; ``differences.png`` plots the AUC ones.

Pairing (ours; the paper reports no intervals): both runs are scored on the same bootstrap
resamples. AUC: resamples of patients (:func:`cxrloc.evaluate.auc.bootstrap_auc` with one seed
draws the same patient ids for every run). Box accuracy: resamples of the patients of the box
images (a box counts as often as its patient is drawn). A difference whose interval holds 0 is "within noise": this test set cannot tell the
two runs apart. Paired intervals are narrower than the two runs' own intervals suggest, since
the images both runs find hard are drawn together.

Runs must have been scored on the same split of one dataset: the same images, labels and
patients; anything else is refused with the folder named. Caches of other sizes made from that
dataset qualify (the report notes it), as do other settings of ``evaluate`` (box mode, CAM
thresholds, mirror TTA, ...): the report names each setting in which the runs differ.
"""

from __future__ import annotations

import json
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxrloc.config import Config
from cxrloc.evaluate.auc import AUCResult, bootstrap_auc
from cxrloc.evaluate.report import variant_of
from cxrloc.evaluate.runner import PREDICTIONS_FILE, Predictions
from cxrloc.evaluate.scoring import evaluate_predictions
from cxrloc.labels import BOX_FINDINGS, FINDINGS

LOC_TS = ("0.1", "0.2", "0.3", "0.4", "0.5", "0.6", "0.7")
TABLE3_TS = ("0.1", "0.3", "0.5", "0.7")  # the paper's Table 3 columns: the differences are reported at these
DEFAULT_RESAMPLES = 1000
#: evaluate settings that change a run's numbers; runs that differ in one are compared with a note saying so
#: (on purpose, e.g. one checkpoint scored with two box modes, or by mistake)
PROTOCOL_KEYS = ("box_mode", "map_threshold", "threshold_grid", "cv_folds", "iou_thresholds", "hflip_tta", "seed")


@dataclass
class Difference:
    """A paired difference (run minus reference) with its bootstrap 95% interval."""

    value: float
    low: float
    high: float
    intervals_overlap: bool = True  # the two runs' own intervals overlap (mean AUC only; True elsewhere)

    @property
    def within_noise(self) -> bool:
        return self.low <= 0.0 <= self.high

    @property
    def verdict(self) -> str:
        if not np.isfinite(self.low):
            return "n/a"
        return "within noise" if self.within_noise else ("worse" if self.high < 0 else "better")

    def to_dict(self) -> dict[str, Any]:
        return {"value": _num(self.value), "low": _num(self.low), "high": _num(self.high),
                "intervals_overlap": self.intervals_overlap, "within_noise": self.within_noise, "verdict": self.verdict}


@dataclass
class EvaluatedRun:
    """One ``cxrloc evaluate`` output folder."""

    name: str
    folder: Path
    metrics: dict[str, Any]
    predictions: Predictions = field(repr=False)
    group: str = ""  # runs of one config (other seeds) share it; default: the name

    def __post_init__(self) -> None:
        self.group = self.group or self.name

    @property
    def variant(self) -> str:
        return self.metrics.get("variant") or variant_of(self.metrics.get("config", {}))

    @property
    def source(self) -> str:
        """The checkpoint evaluated, or the scores file of another model."""
        return self.metrics.get("checkpoint", {}).get("path") or self.metrics.get("predictions", {}).get("scores", "?")


@dataclass
class Comparison:
    """Everything :func:`comparison_sections` and :func:`comparison_dict` show.

    Attributes:
        runs: the runs in the order given.
        reference: name of the run the differences are taken from.
        resamples, seed: of the paired bootstrap.
        differences: run -> {"auc", "loc@0.1", "loc@0.3", "loc@0.5", "loc@0.7"} -> :class:`Difference`
            (every run but the reference).
        finding_differences: run -> finding -> :class:`Difference` of its AUC.
        num_boxes: ground-truth boxes scored (0 without boxes).
        protocol_differences: evaluate setting -> run -> value, for the settings in which the runs differ.
    """

    runs: list[EvaluatedRun]
    reference: str
    resamples: int
    seed: int
    differences: dict[str, dict[str, Difference]]
    finding_differences: dict[str, dict[str, Difference]]
    num_boxes: int
    protocol_differences: dict[str, dict[str, Any]] = field(default_factory=dict)

    def run(self, name: str) -> EvaluatedRun:
        return next(r for r in self.runs if r.name == name)


# --------------------------------------------------------------------------- loading and checking


def load_run(folder: str | Path, name: str | None = None) -> EvaluatedRun:
    """Read ``metrics.json`` and ``predictions.npz`` of an evaluate folder; the name defaults to its config's name."""
    folder = Path(folder)
    metrics_path, preds_path = folder / "metrics.json", folder / PREDICTIONS_FILE
    for path in (metrics_path, preds_path):
        if not path.is_file():
            raise ValueError(f"{folder}: no {path.name} (not a `cxrloc evaluate --out` folder, or evaluate did not finish)")
    try:
        metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{metrics_path}: not valid JSON ({e})") from e
    if not isinstance(metrics, dict) or "classification" not in metrics:
        raise ValueError(f"{metrics_path}: not a metrics.json written by `cxrloc evaluate` (no 'classification')")
    preds = Predictions.load(preds_path)
    default = (metrics.get("checkpoint", {}).get("config_name") or metrics.get("predictions", {}).get("name")
               or folder.name)
    return EvaluatedRun(name or default, folder, metrics, preds)


def load_runs(folders: Sequence[str | Path], names: Sequence[str] | None = None) -> list[EvaluatedRun]:
    """Load two or more evaluate folders and check they scored the same images; names are made unique."""
    if len(folders) < 2:
        raise ValueError(f"compare needs at least two evaluated folders, got {len(folders)}")
    if names is not None and len(names) != len(folders):
        raise ValueError(f"{len(names)} names for {len(folders)} folders")
    runs = [load_run(f, names[i] if names else None) for i, f in enumerate(folders)]
    counts = Counter(r.name for r in runs)
    for group in [n for n, c in counts.items() if c > 1]:  # e.g. dlrv runs of other seeds: told apart by folder
        members = [r for r in runs if r.name == group]
        short = len({r.folder.name for r in members}) == len(members)  # seed0/eval/dlrv, seed1/eval/dlrv: full path
        for r in members:
            r.group, r.name = group, f"{group} ({r.folder.name if short else r.folder})"
    if len({r.name for r in runs}) < len(runs):
        raise ValueError(f"two runs share the name {Counter(r.name for r in runs).most_common(1)[0][0]!r}; "
                         "give each a name (--names)")
    check_same_test_set(runs)
    return runs


def check_same_test_set(runs: Sequence[EvaluatedRun]) -> None:
    """Raise ValueError naming the first run whose split, images, labels or patients differ from the first run's.

    Caches of other image sizes made from one dataset hold the same images, labels and patients: runs
    scored on them are compared (the report notes the other cache, see :func:`protocol_differences`).
    """
    first = runs[0]
    p0 = first.predictions
    order0 = np.argsort(p0.image_ids.astype(str))
    for r in runs[1:]:
        p = r.predictions
        if p.meta.get("split") != p0.meta.get("split"):
            raise ValueError(f"{r.folder}: evaluated on split {p.meta.get('split')!r}, {first.folder} on "
                             f"{p0.meta.get('split')!r}; compare runs scored on one split")
        ids, ids0 = set(p.image_ids.astype(str).tolist()), set(p0.image_ids.astype(str).tolist())
        if ids != ids0:
            raise ValueError(f"{r.folder}: {len(ids ^ ids0)} images differ from those of {first.folder}")
        order = np.argsort(p.image_ids.astype(str))  # both now in image-id order
        for what, a, b in (("labels", p.labels[order], p0.labels[order0]),
                           ("patients", p.patient_ids[order], p0.patient_ids[order0])):
            if not np.array_equal(a, b):
                raise ValueError(f"{r.folder}: the {what} of its images differ from those of {first.folder} "
                                 "(another dataset or split file); compare runs of one dataset")


def pick_reference(runs: Sequence[EvaluatedRun], reference: str | None) -> str:
    """``reference`` (a run name or folder), else the one full-DLRV run, else the first run."""
    if reference is not None:
        for r in runs:
            if reference in (r.name, str(r.folder)) or Path(reference).resolve() == r.folder.resolve():
                return r.name
        raise ValueError(f"--reference {reference!r} is none of the runs: {', '.join(r.name for r in runs)}")
    full = [r.name for r in runs if r.variant == "dlrv"]
    return full[0] if len(full) == 1 else runs[0].name


# --------------------------------------------------------------------------- paired differences


def compare_runs(
    runs: Sequence[EvaluatedRun],
    boxes: pd.DataFrame | None,
    reference: str | None = None,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> Comparison:
    """Paired bootstrap differences of every run from the reference.

    Args:
        runs: from :func:`load_runs` (checked to share their images).
        boxes: the cache's ground-truth boxes (``Cache.boxes``); None or empty: AUC only.
        reference: name or folder of the reference run (see :func:`pick_reference`).
        resamples: bootstrap resamples (patients for AUC, patients of the box images for box accuracy).
        seed: seeds both resamplings.

    Returns:
        :class:`Comparison`.
    """
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    ref = pick_reference(runs, reference)
    auc: dict[str, AUCResult] = {}
    correct: dict[str, np.ndarray] = {}  # (n_boxes, len(TABLE3_TS)) 0/1 at the run's own CAM threshold
    box_key: tuple[np.ndarray, np.ndarray] | None = None
    box_patients = np.zeros(0, dtype=np.int64)
    for r in runs:  # resamples are drawn by patient id: the runs' image order does not matter
        p = r.predictions
        auc[r.name] = bootstrap_auc(p.labels, p.probs, p.patient_ids, n_resamples=resamples, seed=seed,
                                    keep_samples=True)
        if boxes is None or not len(boxes):
            continue
        eval_cfg = Config.from_dict({"eval": {**r.metrics.get("config", {}).get("eval", {}), "bootstrap": 0}},
                                    source=str(r.folder / "metrics.json")).eval
        ev = evaluate_predictions(p, boxes, eval_cfg, progress=False)
        if ev.box_scores is None:
            continue
        key = (ev.box_scores.image_ids.astype(str), ev.box_scores.findings.astype(str))
        box_patients = p.patient_ids[[p.position(i) for i in key[0]]]
        if box_key is not None and not (np.array_equal(key[0], box_key[0]) and np.array_equal(key[1], box_key[1])):
            raise ValueError(f"{r.folder}: its boxes differ from the other runs' (same cache expected)")
        box_key = key
        iou = ev.cv.oof_iou if ev.cv is not None else ev.box_scores.iou[:, ev.box_scores.column(eval_cfg.map_threshold)]
        correct[r.name] = (iou[:, None] > np.array([float(t) for t in TABLE3_TS])[None, :]).astype(np.float64)

    weights = fidx = None
    n_findings = 0
    if box_key is not None:  # resample the patients of the box images, as the AUC resamples patients
        rng = np.random.default_rng(seed)
        _, owner = np.unique(box_patients, return_inverse=True)
        n_pat = int(owner.max()) + 1
        counts = rng.multinomial(n_pat, np.full(n_pat, 1.0 / n_pat), size=resamples)
        weights = counts[:, owner].astype(np.float64)  # (B, n_boxes): each box weighted by its patient's draws
        names, fidx = np.unique(box_key[1], return_inverse=True)
        n_findings = len(names)

    differences: dict[str, dict[str, Difference]] = {}
    finding_differences: dict[str, dict[str, Difference]] = {}
    a_ref = auc[ref]
    for r in runs:
        if r.name == ref:
            continue
        a = auc[r.name]
        overlap = a.mean_ci_low <= a_ref.mean_ci_high and a_ref.mean_ci_low <= a.mean_ci_high
        d = {"auc": _difference(a.mean - a_ref.mean, _mean_auc_samples(a) - _mean_auc_samples(a_ref), overlap)}
        for j, t in enumerate(TABLE3_TS):
            if weights is None or r.name not in correct or ref not in correct:
                d[f"loc@{t}"] = Difference(float("nan"), float("nan"), float("nan"))
                continue
            point = _mean_of_findings(correct[r.name][:, j], correct[ref][:, j], np.ones((1, len(fidx))), fidx, n_findings)[0]
            samples = _mean_of_findings(correct[r.name][:, j], correct[ref][:, j], weights, fidx, n_findings)
            d[f"loc@{t}"] = _difference(float(point), samples)
        differences[r.name] = d
        finding_differences[r.name] = {
            f: _difference(float(a.auc[c] - a_ref.auc[c]), a.samples[:, c] - a_ref.samples[:, c]) for c, f in enumerate(FINDINGS)
        }
    return Comparison(runs=list(runs), reference=ref, resamples=resamples, seed=seed, differences=differences,
                      finding_differences=finding_differences, num_boxes=0 if box_key is None else len(box_key[0]),
                      protocol_differences=protocol_differences(runs))


def protocol_differences(runs: Sequence[EvaluatedRun]) -> dict[str, dict[str, Any]]:
    """Evaluate settings (:data:`PROTOCOL_KEYS`) that are not the same for every run: setting -> run -> value."""
    def setting(r: EvaluatedRun, key: str) -> Any:
        if key == "hflip_tta":  # a prediction setting: what the predictions were made with
            return bool(r.predictions.meta.get("hflip_tta", False))
        if key == "cache":  # another cache of the same images (e.g. another size): other pixels in
            return r.predictions.meta.get("cache", {}).get("root")
        return r.metrics.get("config", {}).get("eval", {}).get(key)

    out = {}
    caches = {json.dumps(r.predictions.meta.get("cache", {}).get("sha256"), sort_keys=True) for r in runs}
    for key in (*PROTOCOL_KEYS, *(("cache",) if len(caches) > 1 else ())):
        values = {r.name: setting(r, key) for r in runs}
        if len({json.dumps(v) for v in values.values()}) > 1:
            out[key] = values
    return out


def _mean_auc_samples(a: AUCResult) -> np.ndarray:
    """(B,) mean over the defined findings of each bootstrap resample."""
    assert a.samples is not None
    with warnings.catch_warnings():  # a resample without positives of a finding gives NaN, which is meant
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(np.where(a.defined[None, :], a.samples, np.nan), axis=1)


def _mean_of_findings(a: np.ndarray, b: np.ndarray, w: np.ndarray, fidx: np.ndarray, n_findings: int) -> np.ndarray:
    """Per resample: mean over findings of the weighted accuracy of ``a`` minus that of ``b``; (B,)."""
    onehot = np.eye(n_findings)[fidx]  # (n, F)
    n = w @ onehot  # (B, F) weighted box counts per finding
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a resample without a finding's boxes: NaN, meant
        acc_a = (w * a) @ onehot / n
        acc_b = (w * b) @ onehot / n
        return np.nanmean(acc_a - acc_b, axis=1)


def _difference(point: float, samples: np.ndarray, overlap: bool = True) -> Difference:
    samples = samples[np.isfinite(samples)]
    if not len(samples) or not np.isfinite(point):
        return Difference(float(point), float("nan"), float("nan"), overlap)
    lo, hi = np.percentile(samples, [2.5, 97.5])
    return Difference(float(point), float(lo), float(hi), overlap)


# --------------------------------------------------------------------------- what the report shows


def headline(m: dict[str, Any]) -> dict[str, Any]:
    """Mean AUC (+ CI), per-finding AUC and box accuracy per T of one evaluate ``metrics.json``."""
    cls = m["classification"]
    loc = m.get("localization", {})
    table = (loc.get("cross_validated") or loc.get("fixed") or {}).get("iou", {}) if loc.get("available") else {}
    return {
        "mean_auc": cls["mean_auc"], "mean_auc_ci": [cls["mean_ci_low"], cls["mean_ci_high"]],
        "auc": {f: cls["per_finding"][f]["auc"] for f in FINDINGS},
        "box_accuracy_mean": {t: table.get("Mean", {}).get(t) for t in LOC_TS},
        "box_accuracy": {f: {t: table.get(f, {}).get(t) for t in LOC_TS} for f in BOX_FINDINGS if f in table},
        "boxes": loc.get("num_boxes", 0),
        "cam_threshold": "cross-validated" if loc.get("cross_validated") else (loc.get("fixed") or {}).get("cam_threshold"),
    }


def seed_groups(comp: Comparison) -> dict[str, dict[str, Any]]:
    """Groups of two or more runs of one config (other training seeds): the spread of their headline numbers."""
    out = {}
    for group in dict.fromkeys(r.group for r in comp.runs):
        members = [r for r in comp.runs if r.group == group]
        if len(members) < 2:
            continue
        heads = [headline(r.metrics) for r in members]
        stats = {"mean_auc": _spread([h["mean_auc"] for h in heads])}
        stats["box_accuracy_mean"] = {t: _spread([h["box_accuracy_mean"].get(t) for h in heads]) for t in TABLE3_TS}
        out[group] = {"runs": [r.name for r in members], **stats}
    return out


def _spread(values: Sequence[float | None]) -> dict[str, float | None]:
    """Mean, sample standard deviation, min and max of the values that exist (None where fewer than two)."""
    v = np.array([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    if len(v) < 2:
        return {"mean": None, "sd": None, "min": None, "max": None, "n": int(len(v))}
    return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)), "min": float(v.min()), "max": float(v.max()), "n": int(len(v))}


def _num(v: float) -> float | None:
    return float(v) if np.isfinite(v) else None
