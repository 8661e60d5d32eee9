"""Every shipped config trains one short epoch with the tiny backbone (and the right loss terms)."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from train_builders import fast_config

from cxrloc.config import available_configs, load_config
from cxrloc.hardware import choose_precision, cpu_capability
from cxrloc.model.checkpoint import load_model
from cxrloc.train import read_summary, train

SHIPPED = available_configs()


def test_all_paper_rows_and_the_demo_are_shipped():
    assert {"baseline", "dlrv", "dlrv_no_rv", "dlrv_no_dl", "dlrv_random_mining", "dlrv_exact_positives",
            "demo"} <= set(SHIPPED)


def test_demo_config_is_cpu_friendly():
    for name in ("demo", "demo_quick"):
        cfg = load_config(name)
        assert cfg.model.backbone in ("densenet-tiny", "densenet-small") and not cfg.model.pretrained, name
        assert cfg.data.image_size <= 128 and cfg.train.accelerator == "cpu" and cfg.train.max_epochs <= 16, name
        assert cfg.loss.use_dl and cfg.loss.use_rv, name  # the demo shows the full method


@pytest.mark.parametrize("name", SHIPPED)
def test_config_runs_one_short_epoch(name, tiny_cache, tmp_path):
    cfg = fast_config(name, "model.output_stride=32", "train.max_epochs=1")
    result = train(cfg, tiny_cache, tmp_path / name, progress="none")
    assert result.status == "completed" and result.epochs_completed == 1
    hist = read_summary(result.run_dir)["history"]
    assert len(hist) == 1 and hist[0]["val_images"] == 14
    assert math.isfinite(hist[0]["val/auc_mean"])
    h = hist[0]
    assert (h["train_triplet"] > 0) == cfg.loss.use_dl  # switched-off terms are exactly zero
    assert (h["train_rv"] > 0) == cfg.loss.use_rv
    w = cfg.loss  # eq. 9: the logged terms are unweighted, the total is weighted
    total = w.weight_g * h["train_bce"] + w.weight_rv * h["train_rv"] + w.weight_dl * h["train_triplet"]
    assert h["train_loss"] == pytest.approx(total, rel=1e-6)
    log = pd.read_csv(result.run_dir / "logs/csv/version_0/metrics.csv")
    for column in ("train/loss_step", "train/bce_step", "train/rv_step", "train/triplet_step", "val/auc_mean",
                   "val/auc_mean_global", "val/auc_mean_ensemble", "val/auc/Cardiomegaly", "lr-Adam"):
        assert column in log.columns, column
    model, stored, _ = load_model(result.best_checkpoint)
    assert stored == cfg and model.use_region == cfg.loss.use_rv


def test_demo_pipeline_synth_prepare_train(tmp_path, capsys):
    """`cxrloc synth` -> `cxrloc prepare` -> `cxrloc train --config demo`, as the README shows."""
    from cxrloc.cli import main

    data, cache, run = tmp_path / "data", tmp_path / "cache", tmp_path / "run"
    assert main(["synth", "--out", str(data), "--images", "48", "--size", "128", "--seed", "0"]) == 0
    assert main(["prepare", "--data-dir", str(data), "--out", str(cache), "--size", "64"]) == 0
    capsys.readouterr()
    rc = main(["train", "--config", "demo", "--data", str(cache), "--out", str(run), "--progress", "none",
               "--set", "data.image_size=64", "--set", "train.max_epochs=1", "--set", "train.batch_size=4"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "status:          completed" in out and (run / "checkpoints/best.pt").is_file()
    model, cfg, ckpt = load_model(run / "checkpoints/best.pt")
    assert cfg.name == "demo" and ckpt["epoch"] == 1


def test_bf16_mixed_and_channels_last_on_cpu(tiny_cache, tmp_path):
    """The GPU settings' code path (autocast bf16, channels_last inputs and weights) runs on the CPU too."""
    cfg = fast_config("dlrv", "train.precision=bf16-mixed", "train.channels_last=true")
    result = train(cfg, tiny_cache, tmp_path / "run", progress="none")
    hist = read_summary(result.run_dir)["history"][0]
    assert result.status == "completed" and math.isfinite(hist["train_loss"]) and math.isfinite(hist["val/auc_mean"])
    ckpt = load_model(result.last_checkpoint)[2]
    assert all(v.dtype == torch.float32 for v in ckpt["state_dict"].values() if v.is_floating_point())  # fp32 master
    # an explicit precision is obeyed and recorded, flagged slow where this CPU emulates bf16
    native = cpu_capability().native_bf16
    for record in (read_summary(result.run_dir)["precision"], ckpt["extra"]["precision"],
                   json.loads((result.run_dir / "run.json").read_text())["precision"]):
        assert record["requested"] == record["used"] == "bf16-mixed" and record["slow"] is (not native)


def test_auto_precision_is_resolved_and_recorded(tiny_cache, tmp_path):
    """``train.precision: auto`` trains in what this CPU runs fast, and the run says which and why."""
    result = train(fast_config("dlrv", "train.precision=auto", "train.max_epochs=1"), tiny_cache, tmp_path / "run",
                   progress="none")
    expected = choose_precision("auto", "cpu")
    record = read_summary(result.run_dir)["precision"]
    assert result.status == "completed"
    assert record == expected.to_dict() and record["used"] == ("bf16-mixed" if cpu_capability().native_bf16 else "32-true")
    run = json.loads((result.run_dir / "run.json").read_text())
    assert run["precision"] == record and run["cpu"]["isa"] == cpu_capability().isa


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_one_epoch_on_gpu_bf16(tiny_cache, tmp_path):
    cfg = fast_config("dlrv", "train.accelerator=gpu", "train.precision=bf16-mixed", "train.channels_last=true")
    result = train(cfg, tiny_cache, tmp_path / "run", progress="none")
    assert result.status == "completed"
    assert math.isfinite(read_summary(result.run_dir)["history"][0]["val/auc_mean"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graphs_train_like_eager_on_gpu(tiny_cache, tmp_path):
    """``train.compile_mode: reduce-overhead`` (CUDA graphs) inside the Lightning loop: same losses, validation, keys.

    Every assertion message carries both runs' histories, so one failing run on a lent GPU says why.
    """
    base = ("dlrv", "train.accelerator=gpu", "train.max_epochs=2")
    eager = train(fast_config(*base), tiny_cache, tmp_path / "eager", progress="none")
    graphs = train(fast_config(*base, "train.compile=true", "train.compile_mode=reduce-overhead"), tiny_cache,
                   tmp_path / "graphs", progress="none")
    assert_trains_like_eager(eager, graphs, epochs=2)


def assert_trains_like_eager(eager, other, epochs: int) -> None:
    """``other`` (a compiled run) against ``eager``: completed, first-epoch loss within 1%, finite later, the same
    checkpoint keys, BatchNorm running means that moved and agree. Messages carry both histories."""
    h_eager, h_other = read_summary(eager.run_dir)["history"], read_summary(other.run_dir)["history"]
    seen = f"eager {eager.status} {h_eager}; compiled {other.status} {h_other}"
    assert eager.status == other.status == "completed" and other.epochs_completed == epochs, seen
    # first epoch only: fused kernels round differently and the RV boxes (a threshold) amplify it later
    # (on the CPU, compiled vs eager: 0.09% / 0.45% / 1.3% apart in epochs 1 / 2 / 3)
    assert h_other[0]["train_loss"] == pytest.approx(h_eager[0]["train_loss"], rel=1e-2), seen
    assert all(math.isfinite(h["train_loss"]) and math.isfinite(h["val/auc_mean"]) for h in h_other), seen
    s_eager = load_model(eager.last_checkpoint)[2]["state_dict"]
    s_other = load_model(other.last_checkpoint)[2]["state_dict"]
    assert list(s_other) == list(s_eager)  # no "_orig_mod." prefixes
    # BatchNorm running statistics are buffers a compiled (or graph-replayed) step must keep updating
    means = [k for k in s_eager if k.endswith("running_mean")]
    assert means
    for key in means:
        a, b = s_eager[key].float(), s_other[key].float()
        assert b.abs().max() > 0, f"{key}: still at its initial zeros after {epochs} compiled epochs"
        assert (a - b).norm() <= 0.1 * a.norm() + 1e-3, f"{key}: eager {a[:4]} vs compiled {b[:4]}"


class ValidationGradModes(Callback):
    """Records (inference_mode, grad enabled) at every validation batch."""

    def __init__(self) -> None:
        self.seen: set[tuple[bool, bool]] = set()

    def on_validation_batch_start(self, *args, **kwargs) -> None:
        self.seen.add((torch.is_inference_mode_enabled(), torch.is_grad_enabled()))


@pytest.mark.slow
def test_reduce_overhead_mode_runs_its_step_marking_on_the_cpu(tiny_cache, tmp_path):
    """The CUDA-graph code path of the module (step marks, ``_cudagraphs``) on the CPU, where inductor skips the
    graphs themselves: Python-level faults show here before a GPU is lent; the GPU test above checks the graphs.

    Validation inside ``fit`` runs under no_grad, not inference_mode (Lightning's fit loop does so whatever
    ``Trainer(inference_mode=...)`` says); the compiled function relies on it: called under inference_mode and
    then trained, it is a known CUDA-graph hazard (pytorch/pytorch#135892)."""
    base = ("dlrv", "train.max_epochs=2")
    modes_eager, modes_marked = ValidationGradModes(), ValidationGradModes()
    eager = train(fast_config(*base), tiny_cache, tmp_path / "eager", progress="none", callbacks=[modes_eager])
    marked = train(fast_config(*base, "train.compile=true", "train.compile_mode=reduce-overhead"), tiny_cache,
                   tmp_path / "marked", progress="none", callbacks=[modes_marked])
    assert_trains_like_eager(eager, marked, epochs=2)
    assert modes_eager.seen == modes_marked.seen == {(False, False)}


@pytest.mark.slow
def test_compiled_backbone_trains_like_eager_and_saves_the_same_keys(tiny_cache, tmp_path):
    """``train.compile`` (ours): the backbone pass under torch.compile; same losses, same checkpoint format."""
    eager = train(fast_config("dlrv"), tiny_cache, tmp_path / "eager", progress="none")
    compiled = train(fast_config("dlrv", "train.compile=true"), tiny_cache, tmp_path / "compiled", progress="none")
    assert_trains_like_eager(eager, compiled, epochs=1)
    h_eager = read_summary(eager.run_dir)["history"][0]
    h_comp = read_summary(compiled.run_dir)["history"][0]
    assert h_comp["train_loss"] == pytest.approx(h_eager["train_loss"], rel=1e-3)  # fused kernels round differently