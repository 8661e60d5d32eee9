"""Training SIGKILLed mid-epoch and mid-checkpoint-write: ``--resume`` continues to the uninterrupted weights.

Each killed run is a child process (``fault_child.py train``) that trains the same
config as the session's reference run and SIGKILLs itself: after a seeded random
batch of epoch 2, or half-way through writing epoch 2's ``last.pt``. Both children
start together (module fixture) to share the start-up cost. The resume runs in this
process through the CLI (``cxrloc train --resume RUN_DIR``).
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from fault_tools import CHILD, child_env

from cxrloc.cli import main
from cxrloc.model.checkpoint import load_checkpoint
from cxrloc.train import read_summary

STEPS_PER_EPOCH = 8  # 30 train anchors / batch 4
KILL_BATCH = int(np.random.default_rng(2024).integers(0, STEPS_PER_EPOCH - 1))  # batch index in epoch 2


@pytest.fixture(scope="module")
def killed_runs(reference_run, tmp_path_factory) -> dict[str, Path]:
    """Run folders of the two killed children: ``mid-epoch`` and ``mid-write``."""
    base = tmp_path_factory.mktemp("killed-train")
    jobs = {"mid-epoch": ("batch", str(KILL_BATCH)), "mid-write": ("checkpoint-write", "2")}
    procs = {}
    for name, (mode, arg) in jobs.items():
        log = open(base / f"{name}.log", "w")  # noqa: SIM115 - closed below
        cmd = [sys.executable, str(CHILD), "train", str(reference_run.cache), str(base / name), mode, arg]
        procs[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env(), cwd=CHILD.parent), log)
    for name, (proc, log) in procs.items():
        rc = proc.wait(timeout=600)
        log.close()
        assert rc == -signal.SIGKILL, f"{name}: exit {rc}\n{(base / f'{name}.log').read_text()[-3000:]}"
    return {name: base / name for name in jobs}


def _assert_same_training_state(a: dict, b: dict) -> None:
    assert a["epoch"] == b["epoch"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), f"weight {k} differs from the uninterrupted run"
    ea, eb = a["extra"], b["extra"]
    assert ea["global_step"] == eb["global_step"] and ea["scheduler"] == eb["scheduler"]
    for sa, sb in zip(ea["optimizer"]["state"].values(), eb["optimizer"]["state"].values(), strict=True):
        for key in sa:
            assert torch.equal(sa[key], sb[key]), f"Adam {key} differs from the uninterrupted run"


def _final_names_are_complete(run: Path) -> None:
    """No checkpoint under its final name is ever truncated: every *.pt loads and verifies."""
    for path in sorted((run / "checkpoints").glob("*.pt")):
        load_checkpoint(path)


def _resume(run: Path, capsys) -> str:
    rc = main(["train", "--resume", str(run), "--progress", "none"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    return out.out


def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(killed_runs, reference_run, capsys):
    run = killed_runs["mid-epoch"]
    _final_names_are_complete(run)
    assert load_checkpoint(run / "checkpoints/last.pt")["epoch"] == 1  # epoch 2 was cut after batch KILL_BATCH
    assert read_summary(run)["status"] == "running"  # a SIGKILL leaves no chance to write "failed"
    text = _resume(run, capsys)
    assert "epochs:          2 of 2" in text and "status:          completed" in text
    _final_names_are_complete(run)
    _assert_same_training_state(load_checkpoint(run / "checkpoints/last.pt"),
                                load_checkpoint(reference_run.run / "checkpoints/last.pt"))
    assert [h["epoch"] for h in read_summary(run)["history"]] == [1, 2]
    assert ([h["train_loss"] for h in read_summary(run)["history"]]
            == [h["train_loss"] for h in read_summary(reference_run.run)["history"]])


def test_sigkill_mid_checkpoint_write_then_resume_equals_uninterrupted(killed_runs, reference_run, capsys):
    run = killed_runs["mid-write"]
    ckpts = run / "checkpoints"
    partial = sorted(ckpts.glob(".last.pt.*.tmp"))
    assert len(partial) == 1, sorted(p.name for p in ckpts.iterdir())  # the kill really was mid-write ...
    full_size = (reference_run.run / "checkpoints/last.pt").stat().st_size
    assert 0 < partial[0].stat().st_size < full_size
    _final_names_are_complete(run)  # ... and last.pt is still the complete epoch-1 file
    assert load_checkpoint(ckpts / "last.pt")["epoch"] == 1
    _resume(run, capsys)
    assert not list(ckpts.glob(".*.tmp")), "the resumed run should remove the half-written temporary file"
    _final_names_are_complete(run)
    _assert_same_training_state(load_checkpoint(ckpts / "last.pt"),
                                load_checkpoint(reference_run.run / "checkpoints/last.pt"))
