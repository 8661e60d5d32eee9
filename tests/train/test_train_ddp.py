"""A 2-process DDP run on the CPU (gloo, ddp_spawn) with the tiny backbone."""

from __future__ import annotations

import math

import pytest
import torch.distributed as dist
from train_builders import N_TRAIN, N_VAL, fast_config

from cxrloc.model.checkpoint import load_checkpoint
from cxrloc.train import read_summary, train


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch built without gloo")
def test_two_process_ddp_on_cpu(tiny_cache, tmp_path):
    cfg = fast_config("dlrv", "train.strategy=ddp_spawn", "train.devices=2", "train.max_epochs=2")
    result = train(cfg, tiny_cache, tmp_path / "run", progress="none")
    assert result.status == "completed" and result.epochs_completed == 2
    hist = read_summary(result.run_dir)["history"]
    # each rank trained on its own shard: 2 x ceil(30 / 2) anchors, one backbone pass per 4 triplets
    assert [h["train_anchors"] for h in hist] == [2 * math.ceil(N_TRAIN / 2)] * 2
    # validation AUC over every val image exactly once (the module checks the gathered rows)
    assert all(h["val_images"] == N_VAL and math.isfinite(h["val/auc_mean"]) for h in hist)
    ckpt = load_checkpoint(result.last_checkpoint)
    assert ckpt["extra"]["sampler"]["world_size"] == 2 and ckpt["extra"]["sampler"]["anchors_per_rank"] == 15
    assert ckpt["extra"]["global_step"] == 2 * math.ceil(15 / 4)  # steps per rank


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch built without gloo")
def test_ddp_resume_continues(tiny_cache, tmp_path):
    """Resume a 1-epoch DDP run to 2 epochs: the loop position and the shards continue."""
    cfg = fast_config("dlrv_no_dl", "train.strategy=ddp_spawn", "train.devices=2", "train.max_epochs=1")
    train(cfg, tiny_cache, tmp_path / "run", progress="none")
    cfg2 = fast_config("dlrv_no_dl", "train.strategy=ddp_spawn", "train.devices=2", "train.max_epochs=2")
    result = train(cfg2, tiny_cache, tmp_path / "run", resume=True, progress="none")
    assert result.status == "completed" and [h["epoch"] for h in read_summary(result.run_dir)["history"]] == [1, 2]
    assert load_checkpoint(result.last_checkpoint)["extra"]["global_step"] == 2 * math.ceil(15 / 4)
