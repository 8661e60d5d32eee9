"""Evaluation: per-finding AUC with patient-level bootstrap CIs (Table 1), CAM boxes, IoU / IoBB
accuracy at T with a cross-validated CAM threshold (Table 2), cached predictions and reports.

Example (from cached predictions, no network)::

    from cxrloc.config import EvalConfig
    from cxrloc.data.cache import Cache
    from cxrloc.evaluate import Predictions, evaluate_predictions

    preds = Predictions.load("eval/predictions.npz")
    ev = evaluate_predictions(preds, Cache("cache").boxes, EvalConfig(box_mode="all"))
    ev.metrics["localization"]["cross_validated"]["iou"]["Mean"]
"""

from __future__ import annotations

from cxrloc.evaluate.auc import AUCResult, bootstrap_auc, roc_auc_per_finding, weighted_auc
from cxrloc.evaluate.boxes import BOX_MODES, boxes_from_map, iobb, iou, scale_boxes, upsample_map
from cxrloc.evaluate.localization import (
    BoxScores,
    CrossValidation,
    accuracy_table,
    centered_box_baseline,
    cross_validate_threshold,
    score_boxes,
)
from cxrloc.evaluate.runner import Predictions, load_or_run_predictions, run_predictions
from cxrloc.evaluate.scoring import Evaluation, evaluate_predictions

__all__ = [
    "AUCResult",
    "BOX_MODES",
    "BoxScores",
    "CrossValidation",
    "Evaluation",
    "Predictions",
    "accuracy_table",
    "bootstrap_auc",
    "boxes_from_map",
    "centered_box_baseline",
    "cross_validate_threshold",
    "evaluate_predictions",
    "iobb",
    "iou",
    "load_or_run_predictions",
    "roc_auc_per_finding",
    "run_predictions",
    "scale_boxes",
    "score_boxes",
    "upsample_map",
    "weighted_auc",
]
