"""NaN/inf in the loss: training stops (``train.nonfinite=stop``, the default) or skips the batch and counts it
(``skip``), and the last good checkpoint is kept. Weights that became non-finite are never saved nor loaded.

Non-finite values are injected by wrapping ``DLRVLoss.forward`` (loss x NaN or x inf at chosen
steps of epoch 2, resumed from the epoch-1 snapshot), by writing a NaN into a weight, and by a
genuinely diverging run (learning rate 1e30).
"""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
from fault_tools import FAST_TRAIN, sha256

from cxrloc.cli import main
from cxrloc.config import load_config
from cxrloc.model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, tensor_sha256
from cxrloc.train import read_summary, train

STEPS_PER_EPOCH = 8


def _checkpoint_hashes(run) -> dict[str, str]:
    return {p.name: sha256(p) for p in sorted((run / "checkpoints").glob("*.pt"))}


def test_stop_keeps_the_last_good_checkpoint_and_resume_recovers(epoch1_copy, reference_run, inject_loss_factor,
                                                                 monkeypatch, capsys):
    before = _checkpoint_hashes(epoch1_copy)
    inject_loss_factor({3: float("nan")})
    assert main(["train", "--resume", str(epoch1_copy), "--progress", "none"]) == 1
    out = capsys.readouterr()
    assert "stopped_nonfinite: non-finite loss at epoch 2, step 10 (batch 2)" in out.err, out.err
    assert "loss=nan" in out.err and "no checkpoint written after the last completed epoch" in out.err
    assert _checkpoint_hashes(epoch1_copy) == before  # last.pt and best.pt: still epoch 1, byte for byte
    summary = read_summary(epoch1_copy)
    assert summary["status"] == "stopped_nonfinite" and summary["epochs_completed"] == 1
    monkeypatch.undo()  # (the fixture patches through this same monkeypatch) a transient fault: resuming from the kept checkpoint gives the uninterrupted result
    assert main(["train", "--resume", str(epoch1_copy), "--progress", "none"]) == 0
    capsys.readouterr()
    a = load_checkpoint(epoch1_copy / "checkpoints/last.pt")["state_dict"]
    b = load_checkpoint(reference_run.run / "checkpoints/last.pt")["state_dict"]
    assert all(torch.equal(a[k], v) for k, v in b.items())


def test_skip_counts_nan_and_inf_batches_in_the_logs(epoch1_copy, inject_loss_factor, caplog, capsys):
    inject_loss_factor({2: float("nan"), 5: float("inf")})
    assert main(["train", "--resume", str(epoch1_copy), "--progress", "none", "--set", "train.nonfinite=skip"]) == 0
    capsys.readouterr()
    warnings = [r.getMessage() for r in caplog.records if "non-finite loss" in r.getMessage()]
    assert len(warnings) == 2 and "loss=nan" in warnings[0] and "loss=inf" in warnings[1]
    assert "optimizer step skipped (2 so far)" in warnings[1]
    history = read_summary(epoch1_copy)["history"]
    assert [h["nonfinite_skipped"] for h in history] == [0, 2] and math.isfinite(history[-1]["train_loss"])
    metrics = pd.read_csv(epoch1_copy / "logs/csv/version_1/metrics.csv")
    assert metrics["train/nonfinite_skipped"].max() == 2
    ckpt = load_checkpoint(epoch1_copy / "checkpoints/last.pt")  # refuses NaN/inf weights, so: all finite
    assert ckpt["epoch"] == 2 and ckpt["extra"]["nonfinite_skipped"] == 2
    steps = {int(s["step"]) for s in ckpt["extra"]["optimizer"]["state"].values()}
    assert steps == {2 * STEPS_PER_EPOCH - 2}  # the two bad batches changed nothing


def test_nonfinite_weights_are_never_saved(epoch1_copy, tmp_path, capsys):
    """skip mode cannot hide a NaN weight (e.g. from a NaN gradient): the epoch's checkpoint is refused."""
    from lightning.pytorch.callbacks import Callback

    class PoisonAWeight(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: ANN001
            if trainer.current_epoch == 1 and batch_idx == 3:
                with torch.no_grad():
                    pl_module.model.global_head.weight[0, 0] = float("nan")

    before = _checkpoint_hashes(epoch1_copy)
    cfg = load_config("dlrv", [*FAST_TRAIN, "train.nonfinite=skip"])
    with pytest.raises(CheckpointError, match=r"last\.pt: not saved: 1 weight tensor\(s\) hold NaN or inf, "
                                              r"e\.g\. \['global_head\.weight'\]"):
        train(cfg, _recorded_cache(epoch1_copy), epoch1_copy, resume=True, progress="none",
              callbacks=[PoisonAWeight()])
    assert _checkpoint_hashes(epoch1_copy) == before
    assert read_summary(epoch1_copy)["status"] == "failed"


def _recorded_cache(run):
    import json

    return json.loads((run / "run.json").read_text())["data"]


def test_checkpoint_with_nonfinite_weights_is_refused_at_load(reference_run, tmp_path):
    ckpt = torch.load(reference_run.run / "checkpoints/best.pt", weights_only=True)
    ckpt["state_dict"]["global_head.bias"][3] = float("inf")
    ckpt["tensor_sha256"] = {k: tensor_sha256(v) for k, v in ckpt["state_dict"].items()}
    torch.save(ckpt, tmp_path / "inf.pt")
    with pytest.raises(CheckpointError, match=r"inf\.pt: 1 weight tensor\(s\) hold NaN or inf .*global_head\.bias"):
        load_checkpoint(tmp_path / "inf.pt")


def test_save_refuses_nonfinite_weights(tmp_path):
    from cxrloc.model import build_model

    cfg = load_config("dlrv", list(FAST_TRAIN))
    model = build_model(cfg.model)
    path = tmp_path / "last.pt"
    save_checkpoint(path, model, cfg, epoch=1, metric=None)
    good = sha256(path)
    with torch.no_grad():
        model.backbone.features.conv0.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="not saved: 1 weight tensor"):
        save_checkpoint(path, model, cfg, epoch=2, metric=None)
    assert sha256(path) == good and sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_a_diverging_run_stops_at_the_first_nonfinite_loss(reference_run, tmp_path):
    """A learning rate of 1e30: real overflow, no injection. Stopped at once; no NaN checkpoint is written."""
    cfg = load_config("dlrv", [*FAST_TRAIN, "train.lr=1e30"])
    result = train(cfg, reference_run.cache, tmp_path / "run", progress="none")
    assert result.status == "stopped_nonfinite" and "non-finite loss at epoch 1" in result.message
    assert result.epochs_completed == 0 and not list((tmp_path / "run").rglob("*.pt"))
