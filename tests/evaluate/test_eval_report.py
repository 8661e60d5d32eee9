"""Scoring cached predictions and writing the report (no network: synthetic predictions)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from cxrloc.config import EvalConfig
from cxrloc.evaluate.boxes import area_coverage_grid
from cxrloc.evaluate.report import paper_reference, variant_of, write_report
from cxrloc.evaluate.runner import Predictions
from cxrloc.evaluate.scoring import dict_to_table, evaluate_predictions
from cxrloc.labels import BOX_FINDINGS, FINDINGS


def _synthetic(rng, n=60, n_box_images=24, oracle=True):
    """Predictions with informative scores and maps drawn from the ground-truth boxes."""
    ids = np.array([f"{i:08d}_000.png" for i in range(n)])
    labels = (rng.random((n, 14)) < 0.3).astype(np.uint8)
    labels[:, 13] = 0  # Hernia absent: AUC undefined
    probs = np.clip(0.3 * labels + 0.7 * rng.random((n, 14)), 0, 1).astype(np.float32)
    boxes = []
    for i in range(n_box_images):
        x, y = rng.uniform(50, 600, 2)
        boxes.append((ids[i], BOX_FINDINGS[i % 8], x, y, rng.uniform(100, 300), rng.uniform(100, 300)))
    boxes_df = pd.DataFrame(boxes, columns=["image_id", "finding", "x", "y", "w", "h"])
    maps = rng.random((n_box_images, 14, 56, 56)).astype(np.float32)  # a finer grid than 7 x 7 works too
    if oracle:
        for i, r in enumerate(boxes_df.itertuples()):
            maps[i, FINDINGS.index(r.finding)] = area_coverage_grid(np.array([r.x, r.y, r.w, r.h]), (1024, 1024), (56, 56))
    preds = Predictions(
        image_ids=ids, patient_ids=np.arange(n) // 2, rows=np.arange(n), labels=labels, probs=probs,
        logits=probs, orig_sizes=np.full((n, 2), 1024), map_index=np.arange(n_box_images), maps=maps,
        meta={"split": "test"},
    )
    return preds, boxes_df


def test_predictions_save_load_round_trip(tmp_path, rng):
    preds, _ = _synthetic(rng)
    preds.save(tmp_path / "p.npz")
    back = Predictions.load(tmp_path / "p.npz")
    for name in ("image_ids", "patient_ids", "labels", "probs", "maps", "map_index", "orig_sizes"):
        np.testing.assert_array_equal(getattr(back, name), getattr(preds, name))
    assert back.meta["split"] == "test"
    assert back.grid_map("00000003_000.png", "Infiltrate").shape == (56, 56)
    with pytest.raises(KeyError, match="no stored map"):
        back.grid_map("00000050_000.png", "Mass")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="bad.npz"):
        Predictions.load(tmp_path / "bad.npz")


def test_evaluate_predictions_and_report(tmp_path, rng):
    preds, boxes = _synthetic(rng)
    cfg = EvalConfig(bootstrap=50)
    ev = evaluate_predictions(preds, boxes, cfg, progress=False)
    m = ev.metrics
    cls = m["classification"]
    assert cls["excluded"] == ["Hernia"] and cls["per_finding"]["Hernia"]["auc"] is None
    assert 0.5 < cls["mean_auc"] <= 1.0
    loc = m["localization"]
    assert loc["available"] and loc["num_boxes"] == 24 and loc["num_box_images"] == 24
    assert len(loc["cross_validated"]["chosen_thresholds"]) == 10
    assert 0.5 in loc["cam_thresholds"] and loc["fixed"]["cam_threshold"] == 0.5
    assert set(loc["fixed"]["iou"]) == {*BOX_FINDINGS, "Mean", "n"}
    # maps drawn from the boxes: the fixed threshold localises most boxes at T = 0.3
    assert loc["fixed"]["iou"]["Mean"]["0.5"] == 1.0
    table = dict_to_table(loc["fixed"]["iou"])
    assert list(table.columns) == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]

    identity = {"checkpoint": {"path": "c.pt", "sha256": "ab" * 32, "config_name": "dlrv", "epoch": 3},
                "data": {"cache": "cache", "split": "test"}}
    paths = write_report(tmp_path / "out", ev, preds, identity, {"name": "dlrv", "loss": {"use_dl": True, "use_rv": True}},
                         image_loader=lambda _: np.full((64, 64), 128, np.uint8), examples_per_finding=2)
    for key in ("metrics", "report_md", "report_html", "roc_curves", "localization_accuracy", "examples"):
        assert paths[key].exists() and paths[key].stat().st_size > 0, key
    for key in ("roc_curves", "localization_accuracy", "examples"):
        assert paths[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    def no_nan(token):
        raise AssertionError(f"metrics.json holds {token}")

    metrics = json.loads(paths["metrics"].read_text(), parse_constant=no_nan)
    assert metrics["checkpoint"]["sha256"] == "ab" * 32 and metrics["paper"]["mean_auc"] == 0.855
    md = paths["report_md"].read_text()
    assert "| **Mean** |" in md and "0.855" in md and "(0.65)" in md and "Hernia" in md
    assert "excluded from the mean: Hernia" in md
    assert "centred box" in md
    html = paths["report_html"].read_text()
    assert html.count("data:image/png;base64,") == 3 and "<table>" in html


def test_without_boxes_or_with_few_box_images(rng):
    preds, boxes = _synthetic(rng, n_box_images=4)
    ev = evaluate_predictions(preds, boxes, EvalConfig(bootstrap=0), progress=False)
    loc = ev.metrics["localization"]
    assert loc["cross_validated"] is None and "fewer than 10 folds" in loc["cross_validated_reason"]
    assert loc["fixed"]["iou"]["n"]["Mean"] == 4
    assert ev.metrics["classification"]["mean_ci_low"] is None  # no resamples, no interval
    ev = evaluate_predictions(preds, boxes.iloc[:0], EvalConfig(bootstrap=0), progress=False)
    assert ev.metrics["localization"] == {"available": False, "reason": "no ground-truth boxes on the images of this split"}


def test_variant_picks_the_papers_row():
    assert variant_of({"loss": {"use_dl": False, "use_rv": True}}) == "dlrv_no_dl"
    assert variant_of({"loss": {"use_dl": True, "use_rv": False}}) == "dlrv_no_rv"
    assert variant_of({"loss": {"use_dl": False, "use_rv": False}}) == "baseline"
    assert variant_of({"loss": {}, "mining": {"ordering": "random"}}) == "dlrv_random_mining"
    no_dl = paper_reference("dlrv_no_dl")
    assert no_dl["mean_auc"] == 0.833 and no_dl["localization_mean"]["0.7"] == 0.06 and no_dl["auc"] == {}
    full = paper_reference("dlrv")
    assert full["auc"]["Hernia"] == 0.927 and full["localization_t0.1"]["Nodule"] == 0.23
    assert paper_reference("baseline")["mean_auc"] == 0.789
    assert paper_reference("dlrv_random_mining")["mean_auc"] == 0.840
