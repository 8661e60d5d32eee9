"""Shared fixture: a tiny cache with boxes, and two tiny random models (baseline, dlrv) evaluated on it."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from cxrloc.cli import main
from cxrloc.config import load_config
from cxrloc.data.cache import write_cache
from cxrloc.labels import BOX_FINDINGS, FINDINGS
from cxrloc.model import build_model, save_checkpoint


@pytest.fixture(scope="session")
def evaluated(tmp_path_factory):
    """(tmp folder with cache/, baseline.pt, dlrv.pt; [eval/baseline, eval/dlrv]): 32 test images, 16 boxes."""
    tmp = tmp_path_factory.mktemp("compare")
    rng = np.random.default_rng(0)
    n = 40
    ids = [f"{i:08d}_000.png" for i in range(n)]
    index = pd.DataFrame({"image_id": ids, "patient_id": np.arange(n) // 2, "split": ["test"] * 32 + ["train"] * 8,
                          "orig_width": 1024, "orig_height": 1024})
    labels = (rng.random((n, 14)) < 0.4).astype(np.uint8)
    labels[:2] = [[1] * 14, [0] * 14]
    for j, name in enumerate(FINDINGS):
        index[name] = labels[:, j]
    rows = [(ids[i], BOX_FINDINGS[i % 8], 100.0 + 20 * i, 200.0, 250.0, 220.0) for i in range(16)]
    write_cache(tmp / "cache", rng.integers(0, 256, (n, 48, 48), dtype=np.uint8), index,
                pd.DataFrame(rows, columns=["image_id", "finding", "x", "y", "w", "h"]))
    folders = []
    for seed, name in enumerate(("baseline", "dlrv")):
        torch.manual_seed(seed)
        cfg = load_config(name, ["model.backbone=densenet-tiny", "model.pretrained=false", "data.image_size=64"])
        save_checkpoint(tmp / f"{name}.pt", build_model(cfg.model, use_region=cfg.loss.use_rv), cfg, epoch=1, metric=0.5)
        folders.append(tmp / "eval" / name)
        assert main(["evaluate", "--checkpoint", str(tmp / f"{name}.pt"), "--data", str(tmp / "cache"), "--out",
                     str(folders[-1]), "--device", "cpu", "--bootstrap", "20", "--examples", "0", "--cv-folds", "4"]) == 0
    return tmp, folders
