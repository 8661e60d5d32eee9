"""A checkpoint (or any file cxrloc reads) carrying a pickle payload that would run code: refused, code never runs.

The payload is ``os.system("touch MARKER")``: if any loader unpickled it, the marker file
would appear. Every entry point that reads a checkpoint is tried (library, predict,
evaluate, train --resume, backbone weights), and the other files a user could be handed
(a cache's images.npy, predictions.npz, a run's config.yaml). A control shows the payload
is live when unpickled unsafely.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from fault_tools import sha256

from cxrloc.cli import main
from cxrloc.data.cache import Cache, CacheError
from cxrloc.model.checkpoint import CheckpointError, load_checkpoint, load_model


class Payload:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


@pytest.fixture
def marker(tmp_path) -> Path:
    path = tmp_path / "PWNED"
    yield path
    assert not path.exists(), "the pickle payload ran"


@pytest.fixture
def evil_checkpoints(reference_run, tmp_path, marker) -> dict[str, Path]:
    """Three ways to smuggle the payload: a bare dict, a real checkpoint's ``extra``, a plain (non-zip) pickle."""
    folder = tmp_path / "evil"
    folder.mkdir()
    bare = folder / "bare.pt"
    torch.save({"format": "cxrloc-checkpoint", "format_version": 1, "state_dict": Payload(marker)}, bare)
    real = torch.load(reference_run.run / "checkpoints/best.pt", weights_only=True)
    real["extra"]["note"] = Payload(marker)
    hidden = folder / "hidden.pt"
    torch.save(real, hidden)
    plain = folder / "plain.pt"
    plain.write_bytes(pickle.dumps({"format": "cxrloc-checkpoint", "x": Payload(marker)}))
    return {"bare": bare, "hidden": hidden, "plain": plain}


def test_control_the_payload_is_live(tmp_path):
    live = tmp_path / "control"
    pickle.loads(pickle.dumps(Payload(live)))
    assert live.exists()


@pytest.mark.parametrize("kind", ["bare", "hidden", "plain"])
def test_load_checkpoint_and_load_model_refuse(evil_checkpoints, marker, kind):
    path = evil_checkpoints[kind]
    expected = "not a complete zip archive" if kind == "plain" else "refused to load: it holds pickled objects"
    with pytest.raises(CheckpointError, match=rf"{kind}\.pt: .*{expected}"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match=expected):
        load_model(path)
    assert not marker.exists()


def test_predict_and_evaluate_refuse(evil_checkpoints, reference_run, synth_data, marker, tmp_path, capsys):
    image = sorted((synth_data / "images").glob("*.png"))[0]
    for kind, path in evil_checkpoints.items():
        assert main(["predict", "--checkpoint", str(path), str(image), "--out", str(tmp_path / "p"),
                     "--device", "cpu"]) == 2
        assert main(["evaluate", "--checkpoint", str(path), "--data", str(reference_run.cache),
                     "--out", str(tmp_path / "e"), "--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert err.count(f"{kind}.pt: ") == 2 and "Traceback" not in err, err
    assert not (tmp_path / "p" / "predictions.json").exists() and not (tmp_path / "e").exists()
    assert not marker.exists()


def test_resume_refuses_a_malicious_last_checkpoint(epoch1_copy, evil_checkpoints, marker, capsys):
    last = epoch1_copy / "checkpoints/last.pt"
    shutil.copy(evil_checkpoints["hidden"], last)
    before = sha256(last)
    assert main(["train", "--resume", str(epoch1_copy), "--progress", "none"]) == 2
    assert "last.pt: refused to load" in capsys.readouterr().err
    assert sha256(last) == before and not marker.exists()


def test_backbone_weights_file_is_refused(evil_checkpoints, marker):
    from cxrloc.config import load_config
    from cxrloc.model import build_model
    from cxrloc.model.backbone import BackboneError

    cfg = load_config("dlrv", ["model.backbone=densenet-tiny", f"model.weights_path={evil_checkpoints['bare']}"])
    with pytest.raises(BackboneError, match="bare.pt: cannot read weights"):
        build_model(cfg.model)
    assert not marker.exists()


def test_cache_and_predictions_files_never_unpickle(clean_cache, tmp_path, marker, capsys):
    """An images.npy of pickled objects whose meta.json checksums were forged to match: refused, not run."""
    root = shutil.copytree(clean_cache, tmp_path / "cache")
    evil = np.empty(3, dtype=object)
    evil[:] = [Payload(marker)] * 3
    np.save(root / "images.npy", evil, allow_pickle=True)
    meta = json.loads((root / "meta.json").read_text())
    meta["files"]["images.npy"] = {"bytes": (root / "images.npy").stat().st_size, "sha256": sha256(root / "images.npy")}
    (root / "meta.json").write_text(json.dumps(meta))
    cache = Cache(root)
    cache.verify()  # forged checksums pass ...
    with pytest.raises(CacheError, match=r"images\.npy: not a readable uint8 array"):  # ... the memmap refuses
        _ = cache.images
    from cxrloc.evaluate.runner import Predictions

    np.savez(tmp_path / "predictions.npz", image_ids=evil, probs=evil, labels=evil, maps=evil, map_index=evil,
             meta=np.array("{}"))
    with pytest.raises(ValueError, match="predictions.npz: not a readable predictions file"):
        Predictions.load(tmp_path / "predictions.npz")
    assert not marker.exists()


def test_run_config_yaml_with_python_tags_is_refused(epoch1_copy, marker, capsys):
    (epoch1_copy / "config.yaml").write_text(f"name: !!python/object/apply:os.system [\"touch '{marker}'\"]\n")
    assert main(["train", "--resume", str(epoch1_copy), "--progress", "none"]) == 2
    err = capsys.readouterr().err
    assert "config.yaml" in err and "Traceback" not in err, err
    assert not marker.exists()
