"""Disk full / file-size limit while writing the cache, a checkpoint and a report: a clear error, good files intact.

Two ways to fill the disk:

* a real kernel limit: ``ulimit -f`` (``RLIMIT_FSIZE``) in a child process with SIGXFSZ
  ignored, so a write past the limit fails with EFBIG ("File too large");
* ENOSPC ("No space left on device") injected into the write of one chosen file
  (:func:`fault_tools.fill_disk_when_writing`), so each output can be hit in turn.
"""

from __future__ import annotations

import pytest
from fault_tools import (
    PREPARE_KW,
    cache_bytes,
    file_size_limit,
    fill_disk_when_writing,
    run_cli,
    sha256,
    tree_state,
)

from cxrloc.cli import main
from cxrloc.data.cache import Cache, CacheError
from cxrloc.data.prepare import prepare_cache
from cxrloc.model.checkpoint import load_checkpoint
from cxrloc.train import read_summary

PREPARE_ARGS = ["--size", "64", "--workers", "1", "--chunk-size", "4", "--no-progress"]


def _no_temporaries(folder) -> None:
    left = sorted(p.name for p in folder.rglob(".*.tmp"))
    assert not left, f"temporary files left behind: {left}"


# --------------------------------------------------------------------------- the cache


def test_prepare_under_a_file_size_limit(synth_data, clean_cache, tmp_path):
    out = tmp_path / "cache"
    proc = run_cli(["prepare", "--data-dir", str(synth_data), "--out", str(out), *PREPARE_ARGS],
                   preexec=file_size_limit(64 * 1024))
    text = proc.stdout
    assert proc.returncode == 2, text
    assert "File too large: cannot write" in text and "images.npy.partial" in text, text
    assert "Traceback" not in text
    assert not (out / "meta.json").exists() and not (out / "images.npy.partial").exists()
    with pytest.raises(CacheError, match="unfinished"):
        Cache(out)
    prepare_cache(synth_data, out, **PREPARE_KW)  # space is back: the rerun completes
    assert cache_bytes(out) == cache_bytes(clean_cache)


def test_finished_cache_is_not_rewritten_under_a_zero_limit(synth_data, clean_cache, tmp_path):
    """A rerun on an up-to-date cache writes nothing, so it succeeds even when no byte can be written."""
    import shutil

    out = tmp_path / "cache"
    shutil.copytree(clean_cache, out)
    before = tree_state(out)
    proc = run_cli(["prepare", "--data-dir", str(synth_data), "--out", str(out), *PREPARE_ARGS],
                   preexec=file_size_limit(0))
    assert proc.returncode == 0 and "up to date" in proc.stdout, proc.stdout
    assert tree_state(out) == before


def test_prepare_reserves_the_partial_file_before_decoding(synth_data, tmp_path, monkeypatch):
    """The partial array is a memmap: its blocks are reserved up front (posix_fallocate), so a full disk is a
    clear error before any image is decoded, not a SIGBUS in a worker (seen on a full tmpfs before the fix)."""
    import errno
    import os

    import cxrloc.data.prepare_worker as worker

    def no_room(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    decoded = []
    monkeypatch.setattr(os, "posix_fallocate", no_room)
    monkeypatch.setattr(worker, "read_image_resized", lambda *a, **k: decoded.append(a))
    out = tmp_path / "cache"
    with pytest.raises(OSError, match=r"No space left on device: cannot write \S*images\.npy\.partial"):
        prepare_cache(synth_data, out, **PREPARE_KW)
    assert decoded == [] and not (out / "images.npy.partial").exists()


@pytest.mark.parametrize("victim", ["prepare_state.json", "report.json", "index.csv", "boxes.csv", "meta.json"])
def test_prepare_disk_full_at_each_output(synth_data, clean_cache, tmp_path, monkeypatch, victim):
    out = tmp_path / "cache"
    failed = fill_disk_when_writing(monkeypatch, victim, budget=10)
    with pytest.raises(OSError, match=rf"No space left on device: cannot write \S*{victim}"):
        prepare_cache(synth_data, out, **PREPARE_KW)
    assert failed, f"{victim} was never written"
    _no_temporaries(out)
    assert not (out / "meta.json").exists()  # the cache says it is unfinished ...
    with pytest.raises(CacheError, match="unfinished"):
        Cache(out)
    monkeypatch.undo()
    prepare_cache(synth_data, out, **PREPARE_KW)  # ... and the rerun finishes it, identical
    assert cache_bytes(out) == cache_bytes(clean_cache)


# --------------------------------------------------------------------------- checkpoints


def test_checkpoint_write_under_a_file_size_limit(epoch1_copy, reference_run, tmp_path, capsys):
    """Resume epoch 2 with room for logs but not for a checkpoint: error names last.pt, epoch 1 files intact."""
    ckpts = epoch1_copy / "checkpoints"
    before = {p.name: sha256(p) for p in ckpts.glob("*.pt")}
    assert (ckpts / "last.pt").stat().st_size > 256 * 1024
    proc = run_cli(["train", "--resume", str(epoch1_copy), "--progress", "none"],
                   preexec=file_size_limit(256 * 1024))
    text = proc.stdout
    assert proc.returncode == 2, text[-3000:]
    assert "File too large: cannot write" in text and "last.pt" in text, text[-3000:]
    assert {p.name: sha256(p) for p in ckpts.glob("*.pt")} == before  # previous good checkpoints intact
    _no_temporaries(epoch1_copy)
    assert load_checkpoint(ckpts / "last.pt")["epoch"] == 1
    summary = read_summary(epoch1_copy)
    assert summary["status"] == "failed" and "last.pt" in summary["message"]
    # room again: the same resume finishes with the weights of an uninterrupted run
    assert main(["train", "--resume", str(epoch1_copy), "--progress", "none"]) == 0
    capsys.readouterr()
    a, b = load_checkpoint(ckpts / "last.pt"), load_checkpoint(reference_run.run / "checkpoints/last.pt")
    assert a["epoch"] == 2 and all(a["state_dict"][k].equal(v) for k, v in b["state_dict"].items())


# --------------------------------------------------------------------------- reports


def _evaluate(reference_run, out, *extra: str) -> int:
    return main(["evaluate", "--checkpoint", str(reference_run.run / "checkpoints/best.pt"),
                 "--data", str(reference_run.cache), "--out", str(out), "--bootstrap", "10", "--cv-folds", "2",
                 "--examples", "1", "--device", "cpu", *extra])


@pytest.fixture(scope="module")
def evaluated(reference_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "report"
    with pytest.MonkeyPatch.context():
        assert _evaluate(reference_run, out) == 0
    return out


@pytest.mark.parametrize("victim, extra", [("metrics.json", ()), ("report.html", ()),
                                           ("predictions.npz", ("--recompute",))])
def test_evaluate_report_disk_full(reference_run, evaluated, tmp_path, monkeypatch, capsys, victim, extra):
    import shutil

    out = tmp_path / "report"
    shutil.copytree(evaluated, out)
    before = tree_state(out)
    failed = fill_disk_when_writing(monkeypatch, victim, budget=100)
    assert _evaluate(reference_run, out, "--box-mode", "all", *extra) == 2
    err = capsys.readouterr().err
    assert failed and f"No space left on device: cannot write {out / victim}" in err, err
    assert "Traceback" not in err
    assert tree_state(out)[victim] == before[victim]  # the previous complete file is still there
    _no_temporaries(out)


def test_predict_json_and_overlay_disk_full(reference_run, synth_data, tmp_path, monkeypatch, capsys):
    images = sorted((synth_data / "images").glob("*.png"))[:3]
    out = tmp_path / "pred"
    args = ["predict", "--checkpoint", str(reference_run.run / "checkpoints/best.pt"), *map(str, images),
            "--out", str(out), "--device", "cpu", "--decode-size", "64", "--workers", "0"]
    assert main(args) == 0
    capsys.readouterr()
    before = tree_state(out)
    for victim in ("predictions.json", "predictions.csv", f"{images[1].stem}.png"):
        with monkeypatch.context() as mp:
            failed = fill_disk_when_writing(mp, victim, budget=50)
            assert main(args) == 2
        err = capsys.readouterr().err
        assert failed and "No space left on device: cannot write" in err and victim in err, err
        assert tree_state(out) == before  # the previous predictions.json and overlays, unchanged
        _no_temporaries(out)
