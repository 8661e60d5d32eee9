"""A checkpoint for another architecture, label set or input size: a clear error saying what differs, no partial load.

The damaged checkpoints are re-saved with valid checksums (what another version of the
code, a hand edit or a different project would produce), so only the consistency checks
of ``load_model`` / resume can catch them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from fault_tools import sha256

from cxrloc.cli import main
from cxrloc.labels import FINDINGS
from cxrloc.model.checkpoint import CheckpointError, load_model, tensor_sha256


def _tampered(src: Path, dst: Path, change: Callable[[dict], None]) -> Path:
    ckpt = torch.load(src, weights_only=True)
    change(ckpt)
    ckpt["tensor_sha256"] = {k: tensor_sha256(v) for k, v in ckpt["state_dict"].items()}
    dst.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, dst)
    return dst


@pytest.fixture
def best(reference_run) -> Path:
    return reference_run.run / "checkpoints/best.pt"


@pytest.fixture
def no_partial_load(monkeypatch) -> list:
    """Records every load_state_dict call: a refused checkpoint must not have loaded any weight."""
    calls = []
    real = torch.nn.Module.load_state_dict

    def spy(self, *args, **kwargs):
        calls.append(type(self).__name__)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "load_state_dict", spy)
    return calls


def _set_backbone(name: str) -> Callable[[dict], None]:
    def change(ckpt: dict) -> None:
        ckpt["config"]["model"]["backbone"] = name
        ckpt["backbone"] = name

    return change


def _drop_key(ckpt: dict) -> None:
    del ckpt["state_dict"]["global_head.weight"]


def _extra_key(ckpt: dict) -> None:
    ckpt["state_dict"]["backbone.extra_layer.weight"] = torch.zeros(3)


def _reshape(ckpt: dict) -> None:
    w = ckpt["state_dict"]["region_head.weight"]
    ckpt["state_dict"]["region_head.weight"] = torch.zeros(w.shape[0], w.shape[1] + 1)


@pytest.mark.parametrize(
    "change, expected",
    [
        (_set_backbone("densenet121"), r"weights do not fit the architecture of its config: \d+ missing keys .*"
                                       r"shape mismatches"),
        (_drop_key, r"1 missing keys \(e\.g\. \['global_head\.weight'\]\)"),
        (_extra_key, r"1 unexpected keys \(e\.g\. \['backbone\.extra_layer\.weight'\]\)"),
        (_reshape, r"1 shape mismatches \(e\.g\. \['region_head\.weight: checkpoint \(14, 65\) vs model \(14, 64\)'\]"),
    ],
    ids=["other-backbone", "missing-key", "unexpected-key", "other-shape"],
)
def test_another_architecture_is_refused_with_the_difference(best, tmp_path, no_partial_load, change, expected):
    path = _tampered(best, tmp_path / "ckpt.pt", change)
    with pytest.raises(CheckpointError, match=expected):
        load_model(path)
    assert no_partial_load == []


@pytest.mark.parametrize(
    "labels, expected",
    [
        (["No Finding", *FINDINGS], r"15 classes vs 14; only in the checkpoint: \['No Finding'\]; missing: \[\]"),
        ([*FINDINGS[:13], "Fracture"], r"only in the checkpoint: \['Fracture'\]; missing: \['Hernia'\]"),
        ([FINDINGS[1], FINDINGS[0], *FINDINGS[2:]], r"another order, first at position 0: 'Cardiomegaly' vs 'Atelectasis'"),
    ],
    ids=["extra-class", "other-class", "other-order"],
)
def test_another_label_set_is_refused_with_the_difference(best, tmp_path, no_partial_load, labels, expected):
    def change(ckpt: dict) -> None:
        ckpt["labels"] = labels
        n = len(labels)
        for head in ("global_head", "region_head"):  # heads sized for the other label set
            w, b = ckpt["state_dict"][f"{head}.weight"], ckpt["state_dict"][f"{head}.bias"]
            ckpt["state_dict"][f"{head}.weight"] = torch.zeros(n, w.shape[1])
            ckpt["state_dict"][f"{head}.bias"] = torch.zeros(n, dtype=b.dtype)

    path = _tampered(best, tmp_path / "ckpt.pt", change)
    with pytest.raises(CheckpointError, match=rf"label set differs from this cxrloc's FINDINGS \(.*{expected}"):
        load_model(path)
    assert no_partial_load == []


def test_another_input_size_is_refused(best, tmp_path, no_partial_load):
    with pytest.raises(CheckpointError, match="trained at image_size 32, asked to run at 224"):
        load_model(best, image_size=224)

    def change(ckpt: dict) -> None:
        ckpt["image_size"] = 224  # metadata and stored config disagree

    path = _tampered(best, tmp_path / "ckpt.pt", change)
    with pytest.raises(CheckpointError, match="image_size 224 differs from its config's data.image_size 32"):
        load_model(path)
    assert no_partial_load == []
    model, cfg, _ = load_model(best, image_size=32)  # the right size loads
    assert cfg.data.image_size == 32 and not model.training


def test_commands_refuse_a_mismatched_checkpoint(best, reference_run, synth_data, tmp_path, capsys):
    path = _tampered(best, tmp_path / "other" / "best.pt", _set_backbone("densenet121"))
    image = sorted((synth_data / "images").glob("*.png"))[0]
    assert main(["predict", "--checkpoint", str(path), str(image), "--out", str(tmp_path / "p"), "--device", "cpu"]) == 2
    assert main(["evaluate", "--checkpoint", str(path), "--data", str(reference_run.cache), "--out", str(tmp_path / "e"),
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("weights do not fit the architecture") == 2 and "Traceback" not in err, err
    assert not (tmp_path / "p" / "predictions.json").exists() and not (tmp_path / "e" / "metrics.json").exists()


@pytest.mark.parametrize("override, field", [("model.backbone=densenet121", "model.backbone"),
                                             ("data.image_size=64", "data.image_size"),
                                             ("loss.use_rv=false", "loss.use_rv")])
def test_resume_with_another_architecture_or_size_is_refused(epoch1_copy, capsys, override, field):
    last = epoch1_copy / "checkpoints/last.pt"
    before = sha256(last)
    assert main(["train", "--resume", str(epoch1_copy), "--progress", "none", "--set", override]) == 2
    err = capsys.readouterr().err
    assert f"cannot resume with a different config; changed: {field}" in err, err
    assert sha256(last) == before
