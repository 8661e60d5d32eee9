"""Localization: accuracy tables, the 10-fold CAM threshold, oracle maps on the real BBox_List."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxrloc.evaluate.boxes import area_coverage_grid
from cxrloc.evaluate.localization import (
    BoxScores,
    accuracy_table,
    centered_box_baseline,
    cross_validate_threshold,
    image_folds,
    mean_accuracy,
    score_boxes,
    select_cam_threshold,
)
from cxrloc.labels import BOX_FINDINGS

T2 = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)


def test_accuracy_table_by_hand():
    values = np.array([0.05, 0.15, 0.55, 0.8, 0.5, 0.35])
    findings = np.array(["Atelectasis", "Atelectasis", "Atelectasis", "Atelectasis", "Mass", "Mass"])
    table = accuracy_table(values, findings, (0.1, 0.5))
    assert table.loc["Atelectasis", 0.1] == 0.75 and table.loc["Atelectasis", 0.5] == 0.5
    assert table.loc["Mass", 0.1] == 1.0 and table.loc["Mass", 0.5] == 0.0  # IoU > T, strictly
    assert np.isnan(table.loc["Nodule", 0.1])  # no boxes: NaN, not in the mean
    assert table.loc["Mean", 0.1] == pytest.approx((0.75 + 1.0) / 2)
    assert table.loc["Atelectasis", "n"] == 4 and table.loc["Mean", "n"] == 6
    cols = mean_accuracy(np.stack([values, values], axis=1), findings, (0.1, 0.5))
    np.testing.assert_allclose(cols[0], table.loc["Mean", [0.1, 0.5]].to_numpy(float))


def test_image_folds_keep_an_images_boxes_together():
    ids = np.array([f"img{i // 2}" for i in range(60)])  # 30 images with 2 boxes each
    folds = image_folds(ids, 10, seed=0)
    assert (folds[::2] == folds[1::2]).all()
    assert np.bincount(folds).tolist() == [6] * 10
    np.testing.assert_array_equal(folds, image_folds(ids, 10, seed=0))
    assert not np.array_equal(folds, image_folds(ids, 10, seed=1))
    with pytest.raises(ValueError, match="at least 10"):
        image_folds(ids[:8], 10, seed=0)


def _scores(rng, n_images=100, cam_ts=(0.3, 0.5, 0.7)) -> BoxScores:
    ids = np.array([f"{i:08d}_000.png" for i in range(n_images)])
    findings = np.array([BOX_FINDINGS[i % 8] for i in range(n_images)])
    iou = rng.random((n_images, len(cam_ts)))
    return BoxScores(ids, findings, np.zeros((n_images, 4)), np.array(cam_ts), iou, iou * 0.9, np.zeros((n_images, len(cam_ts), 4)))


def test_cv_never_looks_at_the_fold_it_scores(rng):
    scores = _scores(rng)
    seen: list[np.ndarray] = []

    def recording_selector(values, findings, ts):
        seen.append(values.copy())
        return select_cam_threshold(values, findings, ts)

    base = cross_validate_threshold(scores, 10, seed=0, selector=recording_selector)
    for f in range(10):  # the selector got exactly the rows of the other nine folds
        np.testing.assert_array_equal(seen[f], scores.iou[base.folds != f])
    # make every fold's own boxes favour the last threshold, and the others favour the first:
    # each fold's choice must follow the other folds, never its own
    for f in range(10):
        rigged = scores.iou.copy()
        held = base.folds == f
        rigged[held] = [0.0, 0.0, 1.0]
        rigged[~held] = [0.9, 0.2, 0.0]
        changed = BoxScores(scores.image_ids, scores.findings, scores.gt_boxes, scores.cam_thresholds, rigged,
                            rigged, scores.pred_boxes)
        cv = cross_validate_threshold(changed, 10, seed=0)
        assert cv.chosen[f] == 0.3  # what the other nine folds prefer
        assert (cv.oof_iou[held] == 0.0).all()  # scored at that threshold: its own best would give 1.0


def test_cv_result_pools_out_of_fold_boxes(rng):
    scores = _scores(rng, cam_ts=(0.2, 0.4, 0.6, 0.8))
    cv = cross_validate_threshold(scores, 10, seed=0)
    for f in range(10):
        held = cv.folds == f
        col = int(np.flatnonzero(scores.cam_thresholds == cv.chosen[f])[0])
        np.testing.assert_array_equal(cv.oof_iou[held], scores.iou[held, col])
        np.testing.assert_array_equal(cv.oof_iobb[held], scores.iobb[held, col])


def _two_blob_map() -> np.ndarray:
    grid = np.zeros((7, 7))
    grid[1, 1] = 1.0
    grid[5, 5] = 0.8
    return grid


def test_score_boxes_uses_the_ground_truth_findings_map_and_any_box_counts():
    gt = pd.DataFrame({"image_id": ["a.png"], "finding": ["Infiltrate"], "x": [735.0], "y": [735.0], "w": [100.0], "h": [100.0]})
    calls = []

    def get_map(image_id, finding):
        calls.append((image_id, finding))
        return _two_blob_map()

    one = score_boxes(gt, get_map, lambda _: (1000, 1000), [0.5], "max_component", progress=False)
    many = score_boxes(gt, get_map, lambda _: (1000, 1000), [0.5], "components", progress=False)
    assert calls == [("a.png", "Infiltration"), ("a.png", "Infiltration")]  # canonical name, GT finding
    assert one.iou[0, 0] == 0.0  # the max component is the other blob
    assert many.iou[0, 0] > 0.8  # one of the component boxes hits the ground truth
    assert many.pred_boxes[0, 0, 0] > 500


def _real_boxes(sample_dir) -> pd.DataFrame:
    df = pd.read_csv(sample_dir / "BBox_List_2017.csv").iloc[:, :6]
    df.columns = ["image_id", "finding", "x", "y", "w", "h"]
    return df


def test_oracle_maps_on_the_real_bbox_list_score_one_at_half_and_beat_a_centred_box(sample_dir):
    df = _real_boxes(sample_dir)
    gt_of = {(r.image_id, r.finding if r.finding != "Infiltrate" else "Infiltration"): r for r in df.itertuples()}
    sizes = {}
    for name in df["image_id"]:  # the sample's images give their true size; the rest are 1024 x 1024
        path = sample_dir / "images" / name
        sizes[name] = Image.open(path).size if path.exists() else (1024, 1024)

    def oracle(image_id, finding):  # a 56 x 56 map drawn from the ground-truth box
        r = gt_of[(image_id, finding)]
        return area_coverage_grid(np.array([r.x, r.y, r.w, r.h]), sizes[image_id], (56, 56))

    sample_rows = df[df["image_id"].isin([p.name for p in (sample_dir / "images").glob("*.png")])]
    assert len(sample_rows) == 2  # Infiltrate on 00000032_037, Pneumonia on 00000150_002
    spread = df.iloc[::3]  # a third of the 984 boxes, every finding, keeps the test fast
    for rows in (sample_rows, spread):
        scores = score_boxes(rows, oracle, sizes.__getitem__, [0.5], progress=False)
        table = accuracy_table(scores.iou[:, 0], scores.findings, T2)
        assert table.loc["Mean", 0.5] == 1.0
        assert (table.loc[table["n"] > 0, 0.5] == 1.0).all()
        assert (table.loc[table["n"] > 0, 0.7] > 0.9).all()
    findings = df["finding"].replace("Infiltrate", "Infiltration").to_numpy()
    baseline = accuracy_table(centered_box_baseline(df, sizes.__getitem__, 0.5), findings, T2)
    # a box centred in the image, half its width and height, on all 984 boxes:
    # Mean accuracy 0.426 at T = 0.1, 0.185 at 0.3, 0.087 at 0.5, 0.008 at 0.7
    # (Cardiomegaly 1.00 / 0.95 / 0.48 / 0.03: the heart sits in the middle)
    assert baseline.loc["Mean", [0.1, 0.3, 0.5, 0.7]].to_numpy(float) == pytest.approx([0.426, 0.185, 0.087, 0.008], abs=0.002)
    assert baseline.loc["Mean", 0.5] < 1.0


def test_eval_config_defaults_are_pinned():
    from cxrloc.config import EvalConfig

    cfg = EvalConfig()
    assert cfg.iou_thresholds == T2  # paper, Table 2
    assert cfg.cv_folds == 10  # paper: 10-fold cross-validation of the CAM threshold
    assert cfg.box_mode == "max_component"  # ours; "all" is the paper-literal box
    assert cfg.map_threshold == 0.5 and cfg.bootstrap == 1000  # ours
    assert cfg.threshold_grid == tuple(round(0.05 * i, 2) for i in range(1, 20))  # ours: 0.05 ... 0.95
