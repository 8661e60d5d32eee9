"""A linear probe on raw pixels: how far a synthetic dataset is from being trivially solvable.

Per finding, an L2 logistic regression on the standardised, downsampled pixels of
the train_val images, scored by ROC AUC on the test images. ``cxrloc synth``'s
"hard" difficulty is meant to leave a real learning problem, i.e. a low probe AUC
(measured in ``benchmarks/synth.py``; a smaller version is a test).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from cxrloc.labels import FINDINGS, encode


def load_pixels(root: str | Path, downsample: int = 32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(X (N, d*d) float32 in [0, 255], labels (N, 14) uint8, is_test (N,) bool) of a dataset folder."""
    root = Path(root)
    entries = pd.read_csv(root / "Data_Entry_2017.csv")
    test = set((root / "test_list.txt").read_text().split("\n"))
    pixels = []
    for name in entries["Image Index"]:
        with Image.open(root / "images" / name) as im:
            pixels.append(np.asarray(im.convert("L").resize((downsample, downsample), Image.BILINEAR), dtype=np.float32).ravel())
    labels = np.stack([encode(s) for s in entries["Finding Labels"]])
    return np.stack(pixels), labels, entries["Image Index"].isin(test).to_numpy()


def linear_probe(root: str | Path, downsample: int = 32, grid: tuple[float, ...] = (0.001, 0.01, 0.1)) -> dict:
    """Best (over the regularisation ``grid``, chosen on the test split: optimistic) per-finding test AUCs.

    Returns:
        ``{"C": best C, "mean_auc": float, "auc": {finding: AUC}}``; findings without
        both classes in the test split are left out of the mean.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    x, y, is_test = load_pixels(root, downsample)
    mu, sd = x[~is_test].mean(0), x[~is_test].std(0) + 1e-3
    x = (x - mu) / sd
    usable = [k for k in range(len(FINDINGS)) if 0 < y[~is_test, k].sum() < (~is_test).sum() and 0 < y[is_test, k].sum() < is_test.sum()]
    best: dict = {}
    for c in grid:
        aucs = {}
        for k in usable:
            model = LogisticRegression(C=c, max_iter=500).fit(x[~is_test], y[~is_test, k])
            aucs[FINDINGS[k]] = float(roc_auc_score(y[is_test, k], model.decision_function(x[is_test])))
        mean = float(np.mean(list(aucs.values())))
        if not best or mean > best["mean_auc"]:
            best = {"C": c, "mean_auc": mean, "auc": aucs}
    return best
