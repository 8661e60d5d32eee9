"""Builders for the training-engine tests: a tiny learnable cache and fast config overrides.

The cache is written with ``write_cache`` from arrays made here (no PNG decoding):
64 x 64 images where each of three findings draws a bright square at its own place,
so a model can learn the labels and the loss goes down within a few epochs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cxrloc.config import Config, load_config
from cxrloc.data.cache import write_cache
from cxrloc.labels import FINDINGS

SIZE = 64
N_TRAIN, N_VAL, N_TEST = 30, 14, 4
#: finding index -> (row, col) of its square's top-left corner
SPOTS = {0: (8, 8), 1: (8, 40), 2: (40, 24)}

#: overrides that make any shipped config run in seconds on 2 CPU cores
FAST = [
    "model.backbone=densenet-tiny",
    "model.pretrained=false",
    "data.image_size=64",
    "data.num_workers=0",
    "train.batch_size=4",
    "train.max_epochs=1",
    "train.accelerator=cpu",
    "train.devices=1",
    "train.log_every_n_steps=1",
    "mining.num_positive_candidates=20",
    "mining.num_negative_candidates=20",
]


def make_arrays(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(n, 64, 64) uint8 images and (n, 14) uint8 labels with a learnable pattern."""
    labels = np.zeros((n, len(FINDINGS)), np.uint8)
    labels[:, list(SPOTS)] = rng.random((n, len(SPOTS))) < 0.4
    images = rng.integers(0, 60, size=(n, SIZE, SIZE)).astype(np.uint8)
    for c, (r, q) in SPOTS.items():
        on = labels[:, c] == 1
        images[on, r : r + 14, q : q + 14] = rng.integers(180, 255, size=(int(on.sum()), 14, 14))
    return images, labels


def build_cache(root: Path, seed: int = 0, with_val: bool = True) -> Path:
    rng = np.random.default_rng(seed)
    n = N_TRAIN + N_VAL + N_TEST
    while True:
        images, labels = make_arrays(n, rng)
        val = labels[N_TRAIN : N_TRAIN + N_VAL, list(SPOTS)]
        if (val.min(0) == 0).all() and (val.max(0) == 1).all():  # every spotted finding has both classes in val
            break
    splits = ["train"] * N_TRAIN + ["val" if with_val else "test"] * N_VAL + ["test"] * N_TEST
    index = pd.DataFrame(
        {
            "image_id": [f"{i:08d}_000.png" for i in range(n)],
            "patient_id": np.arange(n),
            "split": splits,
            "orig_width": 1024,
            "orig_height": 1024,
        }
    )
    for j, name in enumerate(FINDINGS):
        index[name] = labels[:, j]
    write_cache(root, images, index, source={"kind": "tests/train synthetic"})
    return root


def fast_config(name: str = "dlrv", *extra: str) -> Config:
    return load_config(name, [*FAST, *extra])
