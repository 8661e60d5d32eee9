"""AUC: scikit-learn vs torchmetrics, the vectorised weighted AUC, patient-level bootstrap intervals."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from cxrloc.evaluate.auc import (
    bootstrap_auc,
    patient_bootstrap_counts,
    patient_bootstrap_weights,
    roc_auc_per_finding,
    weighted_auc,
)


def _data(rng, n_patients, per_patient=3, n_classes=4, signal=1.0, ties=False):
    patients = np.repeat(np.arange(n_patients), per_patient)
    n = len(patients)
    labels = (rng.random((n, n_classes)) < np.linspace(0.1, 0.5, n_classes)).astype(np.uint8)
    scores = rng.normal(size=(n, n_classes)) + signal * labels
    if ties:
        scores = np.round(scores, 1)
    return labels, scores, patients


def test_auc_matches_torchmetrics_with_ties(rng):
    torchmetrics = pytest.importorskip("torchmetrics")
    labels, scores, _ = _data(rng, 200, ties=True)
    ours = roc_auc_per_finding(labels, scores)
    ref = torchmetrics.functional.classification.multilabel_auroc(
        torch.from_numpy(scores).float(), torch.from_numpy(labels).long(), num_labels=labels.shape[1], average=None,
        thresholds=None,
    ).numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_weighted_auc_equals_sklearn_sample_weight(rng):
    labels, scores, _ = _data(rng, 100, ties=True)
    weights = rng.integers(0, 4, size=(5, len(labels)))
    for c in range(labels.shape[1]):
        ours = weighted_auc(labels[:, c], scores[:, c], weights)
        ref = [roc_auc_score(labels[:, c], scores[:, c], sample_weight=w) for w in weights]
        np.testing.assert_allclose(ours, ref, atol=1e-12)
    # unit weights = the plain AUC; all-tied scores = 0.5; a one-class resample = NaN
    np.testing.assert_allclose(weighted_auc(labels[:, 0], scores[:, 0], np.ones((1, len(labels)), int)),
                               [roc_auc_score(labels[:, 0], scores[:, 0])])
    assert weighted_auc(np.array([0, 1, 0, 1]), np.zeros(4), np.ones((1, 4), int))[0] == 0.5
    assert np.isnan(weighted_auc(np.array([0, 1, 0, 1]), np.arange(4.0), np.array([[1, 0, 1, 0]]))[0])


def test_single_class_finding_is_nan_excluded_and_warned(rng, caplog):
    labels, scores, patients = _data(rng, 60)
    labels[:, 2] = 0
    with caplog.at_level(logging.WARNING):
        res = bootstrap_auc(labels, scores, patients, n_resamples=20, names=["A", "B", "C", "D"])
    assert np.isnan(res.auc[2]) and not res.defined[2] and np.isnan(res.ci_low[2])
    assert "AUC of C is undefined" in caplog.text
    assert res.mean == pytest.approx(np.mean(res.auc[[0, 1, 3]]))


def test_patient_weights_are_shared_by_a_patients_images(rng):
    patients = np.array([7, 7, 7, 3, 3, 9, 11, 11])
    w = patient_bootstrap_weights(patients, 50, rng)
    assert w.shape == (50, 8)
    assert (w[:, 0] == w[:, 1]).all() and (w[:, 1] == w[:, 2]).all() and (w[:, 3] == w[:, 4]).all()
    per_patient = w[:, [0, 3, 5, 6]]
    assert (per_patient.sum(axis=1) == 4).all()  # 4 patients drawn with replacement each time


def test_bootstrap_ci_contains_the_estimate_and_shrinks_with_more_data(rng):
    small = bootstrap_auc(*_data(rng, 100), n_resamples=300, seed=1)
    large = bootstrap_auc(*_data(rng, 1600), n_resamples=300, seed=1)
    for res in (small, large):
        assert (res.ci_low <= res.auc).all() and (res.auc <= res.ci_high).all()
        assert res.mean_ci_low <= res.mean <= res.mean_ci_high
        assert (res.n_valid == 300).all()
    small_width = small.ci_high - small.ci_low
    large_width = large.ci_high - large.ci_low
    assert (large_width < 0.6 * small_width).all()  # 16x the patients: about 1/4 of the width
    assert large.mean_ci_high - large.mean_ci_low < 0.6 * (small.mean_ci_high - small.mean_ci_low)


def test_bootstrap_is_seeded_and_patient_level(rng):
    labels, scores, patients = _data(rng, 80, per_patient=1)
    a = bootstrap_auc(labels, scores, patients, n_resamples=100, seed=3)
    b = bootstrap_auc(labels, scores, patients, n_resamples=100, seed=3)
    np.testing.assert_array_equal(a.ci_low, b.ci_low)
    # the same images duplicated 5x under the same patient: same point estimate, and the
    # patient-level interval stays as wide (resampling images would pretend 5x more data)
    dup = bootstrap_auc(np.repeat(labels, 5, 0), np.repeat(scores, 5, 0), np.repeat(patients, 5), n_resamples=100, seed=3)
    np.testing.assert_allclose(dup.auc, a.auc)
    np.testing.assert_allclose(dup.ci_high - dup.ci_low, a.ci_high - a.ci_low, rtol=1e-9)


def test_bad_inputs(rng):
    labels, scores, patients = _data(rng, 10)
    with pytest.raises(ValueError, match="both be"):
        bootstrap_auc(labels, scores[:, :2], patients)
    with pytest.raises(ValueError, match="NaN"):
        bootstrap_auc(labels, np.where(labels > 0, np.nan, scores), patients)
    with pytest.raises(ValueError, match="groups"):
        bootstrap_auc(labels, scores, patients[:-1])


def test_bootstrap_samples_equal_the_image_level_weighted_auc(rng):
    """The patient-table shortcut gives exactly the per-image weighted AUC of each resample."""
    labels, scores, patients = _data(rng, 150, per_patient=4, ties=True)
    labels[:, 3] = (rng.random(len(labels)) < 0.8)  # a majority-positive finding (roles swapped inside)
    res = bootstrap_auc(labels, scores, patients, n_resamples=40, seed=5, keep_samples=True)
    counts, patient = patient_bootstrap_counts(patients, 40, np.random.default_rng(5))
    weights = counts[:, patient]
    for c in range(labels.shape[1]):
        np.testing.assert_allclose(res.samples[:, c], weighted_auc(labels[:, c], scores[:, c], weights), atol=1e-9)
