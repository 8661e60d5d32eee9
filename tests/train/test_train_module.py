"""Pieces of the LightningModule that need no Trainer: the AUC metric, inputs, optimiser, freezing."""

from __future__ import annotations

import math

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from train_builders import fast_config

from cxrloc.train.module import DLRVModule, nanmean_or_nan, per_finding_auc


def test_per_finding_auc_matches_sklearn_and_is_nan_safe(rng):
    labels = (rng.random((40, 4)) < 0.4).astype(np.uint8)
    labels[:, 2] = 0  # a finding without positives: undefined AUC
    scores = rng.random((40, 4))
    auc = per_finding_auc(labels, scores)
    for c in (0, 1, 3):
        assert math.isclose(auc[c], roc_auc_score(labels[:, c], scores[:, c]))
    assert math.isnan(auc[2])
    assert math.isclose(nanmean_or_nan(auc), np.mean(auc[[0, 1, 3]]))
    assert math.isnan(nanmean_or_nan(np.array([np.nan, np.nan])))


def test_inputs_are_augmented_in_training_only():
    m = DLRVModule(fast_config())
    images = torch.randint(0, 255, (6, 80, 80), dtype=torch.uint8)
    m._augment_generator = torch.Generator().manual_seed(0)
    a = m.train_inputs(images)
    m._augment_generator = torch.Generator().manual_seed(0)
    b = m.train_inputs(images)
    e1, e2 = m.eval_inputs(images), m.eval_inputs(images)
    assert a.shape == e1.shape == (6, 3, 64, 64)
    assert torch.equal(a, b) and torch.equal(e1, e2)  # seeded augmentation repeats
    assert not torch.allclose(a, e1)  # ... and changes the images


def test_optimizer_is_adam_with_step_decay_and_rv_head_frozen_without_rv():
    cfg = fast_config("dlrv_no_rv", "train.lr_decay_epochs=3")
    m = DLRVModule(cfg)
    opt = m.configure_optimizers()
    optimizer, scheduler = opt["optimizer"], opt["lr_scheduler"]["scheduler"]
    assert isinstance(optimizer, torch.optim.Adam) and optimizer.param_groups[0]["lr"] == 1e-3
    assert isinstance(scheduler, torch.optim.lr_scheduler.StepLR)
    assert scheduler.step_size == 3 and scheduler.gamma == 0.1
    assert opt["lr_scheduler"]["interval"] == "epoch"
    trained = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert all(id(p) not in trained for p in m.model.region_head.parameters())
    assert not any(p.requires_grad for p in m.model.region_head.parameters())
    with_rv = DLRVModule(fast_config("dlrv"))
    assert all(p.requires_grad for p in with_rv.model.region_head.parameters())


def test_channels_last_option():
    m = DLRVModule(fast_config("dlrv", "train.channels_last=true"))
    conv = m.model.backbone.features.conv0.weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    x = m.eval_inputs(torch.zeros(2, 64, 64, dtype=torch.uint8))
    assert x.is_contiguous(memory_format=torch.channels_last)
