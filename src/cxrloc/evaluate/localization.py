"""Localization accuracy (Table 2): IoU / IoBB of predicted boxes against the ground truth.

Protocol (METHOD.md, evaluation; Wang et al. 2017):
    * For every ground-truth box (984 on the official test split), the predicted box comes
      from the eq. 11 map of the ground-truth finding on that image, *whatever its score*.
    * The map (on the model's grid) is upsampled bilinearly to the original image size and
      thresholded at a CAM threshold; :mod:`cxrloc.evaluate.boxes` turns it into box(es).
    * The box is correct at T when IoU > T. With box mode ``"components"`` (several boxes)
      the ground-truth box is correct if *any* predicted box has IoU > T (so its IoU is the
      best over the predicted boxes); the other modes give one box.
    * Accuracy per finding for T in {0.1, ..., 0.7}; "Mean" is the mean of the per-finding
      accuracies of the findings that have boxes (8 on the official split).
    * IoBB = intersection / predicted box area, scored the same way (Wang et al. 2017).

The CAM threshold (one value for all findings) is chosen by k-fold cross-validation over the
box images (paper: 10 folds): folds are drawn by *image* (seeded), the threshold is chosen on
k - 1 folds and applied to the held-out fold, so every box gets exactly one out-of-fold
prediction. Ours, as the paper does not say:
    * the criterion maximised on the training folds is the Mean accuracy averaged over all
      IoU thresholds T (one threshold for the whole of Table 2; ties go to the lowest CAM
      threshold);
    * the reported cross-validated accuracy pools the out-of-fold boxes (= the average of the
      fold accuracies weighted by their number of boxes, which is well defined even when a
      fold holds no box of some finding);
    * the IoBB table uses the CAM thresholds chosen for IoU (choosing them for IoBB would
      favour tiny boxes around the peak).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from cxrloc.evaluate.boxes import BoxMode, boxes_from_map, iobb, iou
from cxrloc.labels import BOX_FINDINGS, FINDING_INDEX, canonical

log = logging.getLogger(__name__)

#: Paper's IoU thresholds of Table 2.
TABLE2_THRESHOLDS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)


@dataclass
class BoxScores:
    """IoU and IoBB of every ground-truth box with its predicted box(es), for each CAM threshold.

    Attributes:
        image_ids: (n,) image of each ground-truth box.
        findings: (n,) canonical finding name of each box.
        gt_boxes: (n, 4) xywh in original pixels.
        cam_thresholds: (T,) CAM thresholds (columns of ``iou``/``iobb``), increasing.
        iou: (n, T) best IoU over the predicted boxes at each CAM threshold.
        iobb: (n, T) IoBB of the predicted box with the best IoU (the best IoBB in
            ``"components"`` mode, where any predicted box may make the box correct).
        pred_boxes: (n, T, 4) the predicted box with the best IoU (for figures).
    """

    image_ids: np.ndarray
    findings: np.ndarray
    gt_boxes: np.ndarray
    cam_thresholds: np.ndarray
    iou: np.ndarray
    iobb: np.ndarray
    pred_boxes: np.ndarray

    def __len__(self) -> int:
        return len(self.image_ids)

    def column(self, cam_threshold: float) -> int:
        """Index of a CAM threshold in :attr:`cam_thresholds` (must be one of them)."""
        hits = np.flatnonzero(np.isclose(self.cam_thresholds, cam_threshold))
        if not len(hits):
            raise KeyError(f"CAM threshold {cam_threshold} was not scored; scored: {self.cam_thresholds.tolist()}")
        return int(hits[0])


def score_boxes(
    gt_boxes: pd.DataFrame,
    get_map: Callable[[str, str], np.ndarray],
    get_size: Callable[[str], tuple[int, int]],
    cam_thresholds: Sequence[float],
    mode: BoxMode = "max_component",
    progress: bool = True,
) -> BoxScores:
    """IoU / IoBB of every ground-truth box against the box(es) of its finding's map.

    Args:
        gt_boxes: rows ``image_id, finding, x, y, w, h`` in original pixel coordinates.
        get_map: ``(image_id, finding) -> (h, w)`` eq. 11 map on its grid, values in [0, 1].
        get_size: ``image_id -> (W, H)`` original image size (the map is upsampled to it).
        cam_thresholds: CAM thresholds to score (all at once; sorted and de-duplicated).
        mode: box mode (see :mod:`cxrloc.evaluate.boxes`).
        progress: show a tqdm bar.

    Returns:
        :class:`BoxScores`; each (image, finding) map is turned into boxes once.
    """
    ts = np.unique(np.round(np.asarray(cam_thresholds, dtype=np.float64), 6))
    df = gt_boxes.reset_index(drop=True)
    findings = np.array([canonical(f) for f in df["finding"].astype(str)], dtype=object)
    image_ids = df["image_id"].astype(str).to_numpy(dtype=object)
    gt = df[["x", "y", "w", "h"]].to_numpy(dtype=np.float64)
    n, T = len(df), len(ts)
    best_iou = np.zeros((n, T))
    best_iobb = np.zeros((n, T))
    pred = np.zeros((n, T, 4))
    pairs: dict[tuple[str, str], list[int]] = {}
    for i, key in enumerate(zip(image_ids, findings, strict=True)):
        pairs.setdefault(key, []).append(i)
    for (image_id, finding), rows in tqdm(pairs.items(), desc="boxes", disable=not progress, leave=False):
        per_threshold = boxes_from_map(get_map(image_id, finding), get_size(image_id), ts, mode)
        for t, boxes in enumerate(per_threshold):
            ious = iou(boxes[None, :, :], gt[rows][:, None, :])  # (rows, K)
            iobbs = iobb(boxes[None, :, :], gt[rows][:, None, :])
            k = np.argmax(ious, axis=1)
            best_iou[rows, t] = ious[np.arange(len(rows)), k]
            best_iobb[rows, t] = iobbs.max(axis=1) if mode == "components" else iobbs[np.arange(len(rows)), k]
            pred[rows, t] = boxes[k]
    return BoxScores(image_ids, findings, gt, ts, best_iou, best_iobb, pred)


def accuracy_table(
    values: np.ndarray,
    findings: np.ndarray,
    iou_thresholds: Sequence[float] = TABLE2_THRESHOLDS,
    finding_order: Sequence[str] = BOX_FINDINGS,
) -> pd.DataFrame:
    """Table 2 layout: accuracy (fraction of boxes with value > T) per finding and their mean.

    Args:
        values: (n,) IoU (or IoBB) of each ground-truth box.
        findings: (n,) finding of each box.
        iou_thresholds: columns T.
        finding_order: rows (findings without boxes get NaN and are left out of "Mean").

    Returns:
        DataFrame, index = findings + ["Mean"], columns = T, plus a column ``n`` (boxes).
    """
    values = np.asarray(values, dtype=np.float64)
    findings = np.asarray(findings)
    ts = np.asarray(iou_thresholds, dtype=np.float64)
    correct = values[:, None] > ts[None, :]
    rows = {}
    counts = {}
    for name in finding_order:
        mask = findings == name
        counts[name] = int(mask.sum())
        rows[name] = correct[mask].mean(axis=0) if mask.any() else np.full(len(ts), np.nan)
    table = pd.DataFrame.from_dict(rows, orient="index", columns=list(ts))
    mean = table.mean(axis=0, skipna=True)
    table.loc["Mean"] = mean
    table["n"] = [counts.get(name, 0) for name in finding_order] + [int(sum(counts.values()))]
    return table


def mean_accuracy(values: np.ndarray, findings: np.ndarray, iou_thresholds: Sequence[float]) -> np.ndarray:
    """Mean-of-findings accuracy per T for each column of ``values`` -> (T_cam, len(iou_thresholds)).

    Args:
        values: (n, T_cam) IoU of each box at each CAM threshold.
        findings: (n,) finding of each box; findings without a box are left out.
    """
    values = np.asarray(values, dtype=np.float64)
    ts = np.asarray(iou_thresholds, dtype=np.float64)
    names, inverse = np.unique(np.asarray(findings).astype(str), return_inverse=True)
    correct = (values[:, :, None] > ts[None, None, :]).astype(np.float64)  # (n, T_cam, nT)
    sums = np.zeros((len(names),) + correct.shape[1:])
    np.add.at(sums, inverse, correct)
    counts = np.bincount(inverse, minlength=len(names)).astype(np.float64)
    return (sums / counts[:, None, None]).mean(axis=0)


def select_cam_threshold(values: np.ndarray, findings: np.ndarray, iou_thresholds: Sequence[float]) -> int:
    """Column (CAM threshold) with the best Mean accuracy averaged over the IoU thresholds.

    Args:
        values: (n, T_cam) IoU of the *training* boxes at each CAM threshold.
        findings: (n,) their findings.

    Returns:
        index of the chosen column (the lowest on ties).
    """
    objective = mean_accuracy(values, findings, iou_thresholds).mean(axis=1)
    return int(np.argmax(objective))


@dataclass
class CrossValidation:
    """Result of :func:`cross_validate_threshold`.

    Attributes:
        folds: (n,) fold of every box (folds are drawn by image).
        chosen: (k,) chosen CAM threshold of each fold.
        oof_iou, oof_iobb: (n,) out-of-fold IoU / IoBB: each box scored with the threshold
            chosen on the other folds.
        oof_pred_boxes: (n, 4) the corresponding predicted boxes.
    """

    folds: np.ndarray
    chosen: np.ndarray
    oof_iou: np.ndarray
    oof_iobb: np.ndarray
    oof_pred_boxes: np.ndarray


def image_folds(image_ids: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    """Assign each box a fold in ``[0, n_folds)`` by its image (seeded shuffle of the images)."""
    unique, inverse = np.unique(np.asarray(image_ids).astype(str), return_inverse=True)
    if len(unique) < n_folds:
        raise ValueError(f"{n_folds}-fold cross-validation needs at least {n_folds} box images, got {len(unique)}")
    perm = np.random.default_rng(seed).permutation(len(unique))
    fold_of_image = np.empty(len(unique), dtype=np.int64)
    fold_of_image[perm] = np.arange(len(unique)) % n_folds
    return fold_of_image[inverse]


def cross_validate_threshold(
    scores: BoxScores,
    n_folds: int = 10,
    seed: int = 0,
    iou_thresholds: Sequence[float] = TABLE2_THRESHOLDS,
    selector: Callable[[np.ndarray, np.ndarray, Sequence[float]], int] = select_cam_threshold,
) -> CrossValidation:
    """Choose the CAM threshold on k - 1 folds, score the held-out fold, for every fold.

    The selector only ever receives the training folds' rows (a test checks that changing
    the held-out fold's values cannot change its threshold).

    Args:
        scores: IoU / IoBB at every candidate CAM threshold.
        n_folds: k (paper: 10).
        seed: seeds the fold assignment.
        iou_thresholds: the T values the selection criterion averages over.
        selector: ``(values (n_train, T_cam), findings (n_train,), iou_thresholds) -> column``.

    Returns:
        :class:`CrossValidation`.
    """
    folds = image_folds(scores.image_ids, n_folds, seed)
    chosen = np.zeros(n_folds)
    n = len(scores)
    oof_iou, oof_iobb, oof_pred = np.zeros(n), np.zeros(n), np.zeros((n, 4))
    for f in range(n_folds):
        train = folds != f
        test = np.flatnonzero(~train)
        col = selector(scores.iou[train], scores.findings[train], iou_thresholds)
        chosen[f] = scores.cam_thresholds[col]
        oof_iou[test] = scores.iou[test, col]
        oof_iobb[test] = scores.iobb[test, col]
        oof_pred[test] = scores.pred_boxes[test, col]
    return CrossValidation(folds, chosen, oof_iou, oof_iobb, oof_pred)


def centered_box_baseline(
    gt_boxes: pd.DataFrame, get_size: Callable[[str], tuple[int, int]], fraction: float = 0.5
) -> np.ndarray:
    """IoU of each ground-truth box with a box centred in the image, ``fraction`` of its width and height.

    A reference a model must beat: it uses no image content at all.

    Returns:
        (n,) IoU per ground-truth box.
    """
    out = np.zeros(len(gt_boxes))
    gt = gt_boxes[["x", "y", "w", "h"]].to_numpy(dtype=np.float64)
    for i, image_id in enumerate(gt_boxes["image_id"].astype(str)):
        W, H = get_size(image_id)
        box = np.array([W * (1 - fraction) / 2, H * (1 - fraction) / 2, W * fraction, H * fraction])
        out[i] = iou(box, gt[i])
    return out


def finding_column(finding: str) -> int:
    """Column of a finding in the (N, 14) prediction arrays."""
    return FINDING_INDEX[canonical(finding)]
