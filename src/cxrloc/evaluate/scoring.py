"""Score cached predictions: Table 1 (AUC with bootstrap CIs) and Table 2 (localization accuracy).

Pure numpy on a :class:`~cxrloc.evaluate.runner.Predictions` object; no network runs here,
so re-scoring with other options (box mode, CAM thresholds, folds, resamples) is cheap.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from cxrloc.config import EvalConfig
from cxrloc.evaluate.auc import AUCResult, bootstrap_auc
from cxrloc.evaluate.localization import (
    BoxScores,
    CrossValidation,
    accuracy_table,
    centered_box_baseline,
    cross_validate_threshold,
    mean_accuracy,
    score_boxes,
)
from cxrloc.evaluate.runner import Predictions
from cxrloc.labels import BOX_FINDINGS, FINDINGS, canonical

log = logging.getLogger(__name__)

#: side of the centred reference box, as a fraction of the image's width and height
BASELINE_FRACTION = 0.5


@dataclass
class Evaluation:
    """Everything computed from one predictions file (plots read the arrays, JSON the dict).

    Attributes:
        auc: Table 1 numbers.
        box_scores: IoU / IoBB of every ground-truth box at every CAM threshold (None without boxes).
        cv: the cross-validated CAM threshold (None with fewer box images than folds).
        metrics: JSON-ready dict of every number (see :func:`evaluate_predictions`).
    """

    auc: AUCResult
    box_scores: BoxScores | None
    cv: CrossValidation | None
    metrics: dict[str, Any]


def evaluate_predictions(
    preds: Predictions, boxes: pd.DataFrame, eval_cfg: EvalConfig, progress: bool = True
) -> Evaluation:
    """Table 1 and Table 2 numbers from cached predictions.

    Args:
        preds: network outputs on a split (with maps for its box images).
        boxes: ground-truth boxes (image_id, finding, x, y, w, h), original pixels; rows of
            images outside ``preds`` are ignored.
        eval_cfg: IoU thresholds, box mode, fixed CAM threshold, CV grid, folds, bootstrap, seed.
        progress: tqdm bars.

    Returns:
        :class:`Evaluation`. ``metrics`` has ``classification`` (per finding: auc, ci_low,
        ci_high, n_pos, n_neg; mean and its CI; excluded findings) and ``localization``
        (``cross_validated`` and ``fixed`` tables for IoU and IoBB, the chosen thresholds,
        the CAM-threshold sweep and a centred-box baseline), or ``None`` with a reason.
    """
    auc = bootstrap_auc(
        preds.labels, preds.probs, preds.patient_ids, n_resamples=eval_cfg.bootstrap,
        seed=eval_cfg.seed, names=list(FINDINGS),
    )
    classification = {
        "per_finding": {
            name: {
                "auc": _num(auc.auc[c]),
                "ci_low": _num(auc.ci_low[c]),
                "ci_high": _num(auc.ci_high[c]),
                "n_pos": int(auc.n_pos[c]),
                "n_neg": int(auc.n_neg[c]),
                "valid_resamples": int(auc.n_valid[c]),
            }
            for c, name in enumerate(FINDINGS)
        },
        "mean_auc": _num(auc.mean),
        "mean_ci_low": _num(auc.mean_ci_low),
        "mean_ci_high": _num(auc.mean_ci_high),
        "excluded": [name for c, name in enumerate(FINDINGS) if not auc.defined[c]],
        "bootstrap": {"resamples": auc.n_resamples, "unit": "patient", "confidence": auc.confidence,
                      "seed": eval_cfg.seed, "method": "percentile"},
    }
    metrics: dict[str, Any] = {
        "num_images": len(preds),
        "num_patients": int(len(np.unique(preds.patient_ids))),
        "classification": classification,
    }
    box_scores, cv, localization = _localization(preds, boxes, eval_cfg, progress)
    metrics["localization"] = localization
    return Evaluation(auc, box_scores, cv, metrics)


def _localization(
    preds: Predictions, boxes: pd.DataFrame, cfg: EvalConfig, progress: bool
) -> tuple[BoxScores | None, CrossValidation | None, dict[str, Any]]:
    external = preds.meta.get("external")
    if external is not None and external.get("maps") is None:
        return None, None, {"available": False, "reason": "the predictions have no maps (scores only; "
                                                          "`cxrloc evaluate --predictions ... --maps FILE` adds them)"}
    box_images = set(preds.image_ids[preds.map_index].astype(str).tolist())
    gt = boxes[boxes["image_id"].astype(str).isin(box_images)].reset_index(drop=True) if len(boxes) else boxes
    if len(gt) == 0:
        return None, None, {"available": False, "reason": "no ground-truth boxes on the images of this split"}
    gt = gt.assign(finding=[canonical(f) for f in gt["finding"].astype(str)])
    ts = np.unique(np.round(np.r_[np.asarray(cfg.threshold_grid, dtype=np.float64), cfg.map_threshold], 6))
    iou_ts = list(cfg.iou_thresholds)
    scores = score_boxes(gt, preds.grid_map, preds.size_of, ts, cfg.box_mode, progress=progress)
    fixed_col = scores.column(cfg.map_threshold)
    out: dict[str, Any] = {
        "available": True,
        "box_mode": cfg.box_mode,
        "hflip_tta": bool(preds.meta.get("hflip_tta", False)),  # maps averaged with the mirrored image's
        "num_boxes": len(scores),
        "num_box_images": len(np.unique(scores.image_ids)),
        "iou_thresholds": iou_ts,
        "cam_thresholds": scores.cam_thresholds.tolist(),
        "fixed": {
            "cam_threshold": cfg.map_threshold,
            "iou": table_to_dict(accuracy_table(scores.iou[:, fixed_col], scores.findings, iou_ts)),
            "iobb": table_to_dict(accuracy_table(scores.iobb[:, fixed_col], scores.findings, iou_ts)),
        },
        "sweep": {
            "mean_iou_accuracy": {
                _key(t): dict(zip(map(_key, iou_ts), map(_num, row), strict=True))
                for t, row in zip(scores.cam_thresholds, mean_accuracy(scores.iou, scores.findings, iou_ts), strict=True)
            }
        },
    }
    baseline = centered_box_baseline(gt, preds.size_of, BASELINE_FRACTION)
    out["baseline_centered"] = {"fraction": BASELINE_FRACTION,
                                "iou": table_to_dict(accuracy_table(baseline, scores.findings, iou_ts))}
    cv = None
    n_images = out["num_box_images"]
    if n_images >= cfg.cv_folds:
        cv = cross_validate_threshold(scores, cfg.cv_folds, cfg.seed, iou_ts)
        out["cross_validated"] = {
            "folds": cfg.cv_folds,
            "seed": cfg.seed,
            "fold_unit": "image",
            "criterion": "Mean accuracy averaged over the IoU thresholds, on the other folds",
            "chosen_thresholds": cv.chosen.tolist(),
            "iou": table_to_dict(accuracy_table(cv.oof_iou, scores.findings, iou_ts)),
            "iobb": table_to_dict(accuracy_table(cv.oof_iobb, scores.findings, iou_ts)),
        }
    else:
        out["cross_validated"] = None
        out["cross_validated_reason"] = f"{n_images} box image(s), fewer than {cfg.cv_folds} folds"
        log.warning("localization: %s; only the fixed CAM threshold is reported", out["cross_validated_reason"])
    return scores, cv, out


def table_to_dict(table: pd.DataFrame) -> dict[str, Any]:
    """Accuracy table -> ``{finding: {"0.1": acc, ...}, ..., "Mean": {...}, "n": {finding: count}}``."""
    out: dict[str, Any] = {}
    value_cols = [c for c in table.columns if c != "n"]
    for name, row in table.iterrows():
        out[str(name)] = {_key(c): _num(row[c]) for c in value_cols}
    out["n"] = {str(name): int(v) for name, v in table["n"].items()}
    return out


def dict_to_table(d: dict[str, Any], order: tuple[str, ...] = BOX_FINDINGS) -> pd.DataFrame:
    """Inverse of :func:`table_to_dict` (rows = findings + Mean, columns = T as floats)."""
    rows = [*order, "Mean"]
    data = {name: {float(k): (np.nan if v is None else v) for k, v in d[name].items()} for name in rows if name in d}
    return pd.DataFrame.from_dict(data, orient="index")


def _key(value: float) -> str:
    return f"{float(value):g}"


def _num(value: Any) -> float | None:
    v = float(value)
    return None if np.isnan(v) else v
