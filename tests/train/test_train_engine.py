"""End-to-end training runs on the tiny cache: resume equality, determinism, checkpoints, errors."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from train_builders import build_cache, fast_config

from cxrloc.cli import main
from cxrloc.config import ConfigError
from cxrloc.data.cache import CacheError
from cxrloc.model.checkpoint import load_checkpoint
from cxrloc.train import read_summary, train
from cxrloc.train.engine import TrainResult

PLAIN = (dict, list, tuple, str, int, float, bool, type(None), torch.Tensor)


def _run(cache: Path, out: Path, *overrides: str, name: str = "dlrv", resume: bool = False) -> TrainResult:
    return train(fast_config(name, *overrides), cache, out, resume=resume, progress="none")


def _assert_plain(obj: object, where: str = "checkpoint") -> None:
    assert isinstance(obj, PLAIN), f"{where}: {type(obj).__name__} is not a plain type"
    if isinstance(obj, dict):
        for k, v in obj.items():
            assert isinstance(k, str | int), f"{where}: key {k!r}"
            _assert_plain(v, f"{where}.{k}")
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            _assert_plain(v, f"{where}[{i}]")


def _assert_same_state(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: {k} differs (max |diff| {(a[k].float() - b[k].float()).abs().max()})"


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tiny_cache, tmp_path):
    """3 epochs straight == 2 epochs, then --resume to 3 (LR decays after epoch 2, so the scheduler is tested)."""
    common = ["train.lr_decay_epochs=2", "mining.curriculum_epochs=2"]
    straight = _run(tiny_cache, tmp_path / "straight", *common, "train.max_epochs=3")
    first = _run(tiny_cache, tmp_path / "resumed", *common, "train.max_epochs=2")
    assert first.epochs_completed == 2 and first.status == "completed"
    resumed = _run(tiny_cache, tmp_path / "resumed", *common, "train.max_epochs=3", resume=True)
    assert resumed.status == "completed" and resumed.epochs_completed == 3

    a = load_checkpoint(straight.last_checkpoint)
    b = load_checkpoint(resumed.last_checkpoint)
    assert a["epoch"] == b["epoch"] == 3
    _assert_same_state(a["state_dict"], b["state_dict"], "model")
    assert a["extra"]["global_step"] == b["extra"]["global_step"] == 3 * 8  # 30 anchors / batch 4 -> 8 steps
    for sa, sb in zip(a["extra"]["optimizer"]["state"].values(), b["extra"]["optimizer"]["state"].values(),
                      strict=True):
        _assert_same_state(sa, sb, "adam state")
    assert a["extra"]["scheduler"] == b["extra"]["scheduler"]
    assert a["extra"]["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-4)  # decayed after epoch 2
    # identical histories, the resumed one stitched from two legs
    ha, hb = read_summary(straight.run_dir)["history"], read_summary(resumed.run_dir)["history"]
    assert [h["epoch"] for h in hb] == [1, 2, 3]
    assert [h["train_loss"] for h in ha] == [h["train_loss"] for h in hb]
    assert [h["val/auc_mean"] for h in ha] == [h["val/auc_mean"] for h in hb]
    # logs: one CSV version per leg, the resumed leg counts epochs from 2 (0-based) and steps from 16
    log2 = pd.read_csv(resumed.run_dir / "logs/csv/version_1/metrics.csv")
    assert set(log2["epoch"].dropna().astype(int)) == {2}
    assert log2["step"].min() >= 16
    assert (resumed.run_dir / "logs/tensorboard/version_1").is_dir()


def test_same_seed_same_metrics_other_seed_differs(tiny_cache, tmp_path):
    r1 = _run(tiny_cache, tmp_path / "a", "train.seed=3")
    r2 = _run(tiny_cache, tmp_path / "b", "train.seed=3")
    r3 = _run(tiny_cache, tmp_path / "c", "train.seed=4")
    h1, h2, h3 = (read_summary(r.run_dir)["history"] for r in (r1, r2, r3))
    keys = ["train_loss", "train_bce", "train_rv", "train_triplet", "val/auc_mean", "val/auc_mean_global"]
    assert [[h[k] for k in keys] for h in h1] == [[h[k] for k in keys] for h in h2]
    _assert_same_state(load_checkpoint(r1.last_checkpoint)["state_dict"],
                       load_checkpoint(r2.last_checkpoint)["state_dict"], "same seed")
    assert [h["train_loss"] for h in h1] != [h["train_loss"] for h in h3]


def test_loss_goes_down(tiny_cache, tmp_path):
    r = _run(tiny_cache, tmp_path / "run", "train.max_epochs=5", "train.batch_size=6")
    hist = read_summary(r.run_dir)["history"]
    losses = [h["train_loss"] for h in hist]
    assert losses[-1] < 0.9 * losses[0], losses
    assert hist[-1]["train_bce"] < 0.9 * hist[0]["train_bce"]
    assert hist[-1]["train_rv"] < hist[0]["train_rv"]


def test_checkpoints_are_plain_and_complete(tiny_cache, tmp_path):
    r = _run(tiny_cache, tmp_path / "run", "train.max_epochs=2")
    run = r.run_dir
    assert (run / "config.yaml").is_file() and (run / "run.json").is_file()
    for path in (run / "checkpoints/last.pt", run / "checkpoints/best.pt"):
        raw = torch.load(path, weights_only=True, map_location="cpu")
        _assert_plain(raw, path.name)
        extra = raw["extra"]
        for key in ("optimizer", "scheduler", "global_step", "epochs_completed", "best_metric", "sampler", "rng",
                    "nonfinite_skipped", "val"):
            assert key in extra, key
        assert raw["config"] == fast_config("dlrv", "train.max_epochs=2").to_dict()
        assert extra["sampler"]["next_epoch"] == raw["epoch"] and extra["sampler"]["anchors_per_rank"] == 30
        assert isinstance(extra["rng"]["torch"], torch.Tensor) and isinstance(extra["rng"]["augment"], torch.Tensor)
    best = torch.load(run / "checkpoints/best.pt", weights_only=True)
    summary = read_summary(run)
    assert best["epoch"] == summary["best_epoch"] == r.best_epoch
    assert math.isclose(best["metric"], summary["best_metric"])
    assert summary["best_metric"] == max(h["val/auc_mean"] for h in summary["history"])


def test_nonfinite_skip_counts_and_continues(tiny_cache, tmp_path, inject_loss_factor):
    inject_loss_factor({3: float("nan"), 11: float("nan")})
    r = _run(tiny_cache, tmp_path / "run", "train.max_epochs=2", "train.nonfinite=skip")
    assert r.status == "completed" and r.epochs_completed == 2
    hist = read_summary(r.run_dir)["history"]
    assert [h["nonfinite_skipped"] for h in hist] == [1, 2]
    assert all(math.isfinite(h["train_loss"]) for h in hist)
    ckpt = load_checkpoint(r.last_checkpoint)
    adam_steps = {float(st["step"]) for st in ckpt["extra"]["optimizer"]["state"].values()}
    assert adam_steps == {2 * 8 - 2}  # the two NaN batches updated nothing
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    log = pd.read_csv(r.run_dir / "logs/csv/version_0/metrics.csv")
    assert log["train/nonfinite_skipped"].max() == 2


def test_nonfinite_stop_keeps_last_good_checkpoint(tiny_cache, tmp_path, inject_loss_factor, capsys):
    inject_loss_factor({8 + 3: float("nan")})  # 4th step of epoch 2
    r = _run(tiny_cache, tmp_path / "run", "train.max_epochs=3", "train.nonfinite=stop")
    assert r.status == "stopped_nonfinite"
    assert "non-finite loss at epoch 2" in r.message and "stopped" in r.message
    assert r.epochs_completed == 1
    ckpt = load_checkpoint(tmp_path / "run/checkpoints/last.pt")
    assert ckpt["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


def test_resume_guards(tiny_cache, tmp_path):
    run = tmp_path / "run"
    _run(tiny_cache, run, "train.max_epochs=1")
    with pytest.raises(ValueError, match="already holds a training run"):
        _run(tiny_cache, run, "train.max_epochs=1")
    with pytest.raises(ConfigError, match=r"changed: loss\.margin"):
        _run(tiny_cache, run, "train.max_epochs=2", "loss.margin=0.7", resume=True)
    done = _run(tiny_cache, run, "train.max_epochs=1", resume=True)
    assert done.status == "nothing_to_do"
    with pytest.raises(Exception, match="nothing to resume"):
        _run(tiny_cache, tmp_path / "empty", resume=True)


def test_cli_train_and_resume(tiny_cache, tmp_path, capsys):
    out = tmp_path / "run"
    sets = [a for o in ["model.backbone=densenet-tiny", "model.pretrained=false", "data.image_size=64",
                        "data.num_workers=0", "train.batch_size=8", "train.max_epochs=1", "train.accelerator=cpu",
                        "train.devices=1"] for a in ("--set", o)]
    rc = main(["train", "--config", "dlrv_no_dl", "--data", str(tiny_cache), "--out", str(out), "--seed", "5",
               "--progress", "none", *sets])
    text = capsys.readouterr().out
    assert rc == 0
    assert f"run folder:      {out}" in text and "best val/auc_mean:" in text and "best.pt" in text
    assert load_checkpoint(out / "checkpoints/best.pt")["config"]["train"]["seed"] == 5
    # resume from the run folder alone: config and data come from RUN_DIR
    rc = main(["train", "--resume", str(out), "--set", "train.max_epochs=2", "--progress", "none"])
    assert rc == 0 and "epochs:          2 of 2" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--config", "dlrv", "--set", "train.epochs=3"], "unknown key 'train.epochs'"),
        (["--config", "nonexistent_cfg"], "config 'nonexistent_cfg' not found"),
        (["--config", "dlrv", "--set", "train.devices=two"], "train.devices = 'two'"),
        (["--config", "dlrv", "--data", "MISSING"], "cache folder does not exist"),
        (["--data", "X"], "a new run needs --config"),
    ],
)
def test_cli_errors_are_clear(tiny_cache, tmp_path, capsys, argv, message):
    argv = [a.replace("MISSING", str(tmp_path / "nope")) for a in argv]
    if "--data" not in argv:
        argv += ["--data", str(tiny_cache)]
    rc = main(["train", *argv, "--out", str(tmp_path / "run"), "--progress", "none",
               "--set", "train.accelerator=cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err


def test_without_val_split_trains_and_keeps_the_first_epoch_as_best(tmp_path):
    cache = build_cache(tmp_path / "cache", with_val=False)
    r = _run(cache, tmp_path / "run", "train.max_epochs=2", name="baseline")
    assert r.status == "completed" and r.epochs_completed == 2
    assert r.best_epoch == 1 and r.best_metric is None  # NaN metric: never improves
    assert load_checkpoint(r.best_checkpoint)["epoch"] == 1 and load_checkpoint(r.last_checkpoint)["epoch"] == 2


def test_missing_cache_is_a_cache_error(tmp_path):
    with pytest.raises(CacheError, match="does not exist"):
        train(fast_config(), tmp_path / "nope", tmp_path / "run")
