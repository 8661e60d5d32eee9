"""Checkpoints: roundtrip, strict architecture checks, corruption, and refusal of pickle payloads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from cxrloc.config import load_config
from cxrloc.labels import FINDINGS
from cxrloc.model import CheckpointError, build_model, load_checkpoint, load_model, save_checkpoint
from cxrloc.model.checkpoint import tensor_sha256

MARKER_ENV = "CXRLOC_TEST_MARKER"


def tiny_cfg(*overrides: str):
    return load_config("dlrv", ["model.backbone=densenet-tiny", "model.pretrained=false", "data.image_size=64",
                                *overrides])


@pytest.fixture
def saved(tmp_path):
    cfg = tiny_cfg()
    torch.manual_seed(0)
    model = build_model(cfg.model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(2, 3, 64, 64))["logits"].sum().backward()
    opt.step()
    path = tmp_path / "ckpt" / "best.pt"
    save_checkpoint(path, model, cfg, epoch=3, metric=0.75, extra={"optimizer": opt.state_dict(), "step": 12})
    return path, model, cfg


def resave(path: Path, ckpt: dict, fix_checksums: bool = True) -> None:
    if fix_checksums:
        ckpt["tensor_sha256"] = {k: tensor_sha256(v) for k, v in ckpt["state_dict"].items()}
    torch.save(ckpt, path)


def test_roundtrip_restores_model_config_and_extra(saved):
    path, model, cfg = saved
    loaded, cfg2, ckpt = load_model(path)
    assert not loaded.training
    assert cfg2.to_dict() == cfg.to_dict()
    assert ckpt["epoch"] == 3 and ckpt["metric"] == 0.75 and ckpt["labels"] == list(FINDINGS)
    assert ckpt["image_size"] == 64 and ckpt["backbone"] == "densenet-tiny"
    assert set(ckpt["versions"]) == {"cxrloc", "torch", "torchvision"}
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(loaded.predict(x)["probs"], model.predict(x)["probs"])
    assert ckpt["extra"]["step"] == 12
    opt = torch.optim.Adam(loaded.parameters(), lr=1e-3)
    opt.load_state_dict(ckpt["extra"]["optimizer"])  # plain types survive weights_only
    assert not list(path.parent.glob(".*.tmp"))  # atomic write left no temp file


def test_use_region_follows_stored_loss_config(tmp_path):
    cfg = tiny_cfg("loss.use_rv=false")
    path = tmp_path / "no_rv.pt"
    save_checkpoint(path, build_model(cfg.model, use_region=False), cfg, 1, None)
    model, _, ckpt = load_model(path)
    assert model.use_region is False and ckpt["metric"] is None


def test_input_size_mismatch(saved):
    path, _, _ = saved
    with pytest.raises(CheckpointError, match="image_size 64, asked to run at 224"):
        load_model(path, image_size=224)
    assert load_model(path, image_size=64)[0] is not None


def test_missing_unexpected_and_shape_mismatch_are_listed(saved):
    path, _, _ = saved
    ckpt = torch.load(path, weights_only=True)
    state = ckpt["state_dict"]
    state["extra_head.weight"] = torch.zeros(3)
    del state["region_head.bias"]
    state["global_head.weight"] = torch.zeros(14, 5)
    resave(path, ckpt)
    with pytest.raises(CheckpointError) as err:
        load_model(path)
    message = str(err.value)
    assert str(path) in message
    assert "missing keys" in message and "region_head.bias" in message
    assert "unexpected keys" in message and "extra_head.weight" in message
    assert "shape mismatches" in message and "global_head.weight: checkpoint (14, 5) vs model (14, 64)" in message


def test_architecture_mismatch_from_config(saved):
    path, _, _ = saved
    ckpt = torch.load(path, weights_only=True)
    ckpt["config"]["model"]["backbone"] = "densenet121"
    resave(path, ckpt)
    with pytest.raises(CheckpointError, match="do not fit the architecture"):
        load_model(path)


def test_label_set_mismatch(saved):
    path, _, _ = saved
    ckpt = torch.load(path, weights_only=True)
    ckpt["labels"] = list(reversed(FINDINGS))
    resave(path, ckpt)
    with pytest.raises(CheckpointError, match="label set differs"):
        load_model(path)


def test_checksum_mismatch_is_detected(saved):
    path, _, _ = saved
    ckpt = torch.load(path, weights_only=True)
    ckpt["state_dict"]["global_head.bias"][3] += 1.0
    resave(path, ckpt, fix_checksums=False)
    with pytest.raises(CheckpointError, match="checksum mismatch in 1 tensor.*global_head.bias"):
        load_checkpoint(path)


def test_truncated_and_missing_files(saved, tmp_path):
    path, _, _ = saved
    data = path.read_bytes()
    short = tmp_path / "short.pt"
    short.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="short.pt: corrupt or truncated"):
        load_checkpoint(short)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(CheckpointError, match="not a cxrloc checkpoint"):
        load_checkpoint(other)
    ckpt = torch.load(path, weights_only=True)
    ckpt["format_version"] = 99
    resave(path, ckpt)
    with pytest.raises(CheckpointError, match="format version 99"):
        load_checkpoint(path)


class Payload:
    """Unpickling this runs os.system-like code: writes the marker file named in the environment."""

    def __reduce__(self):
        return (_write_marker, (os.environ[MARKER_ENV],))


def _write_marker(path: str) -> str:
    Path(path).write_text("pwned")
    return path


def test_malicious_pickle_is_refused(tmp_path, monkeypatch):
    marker = tmp_path / "marker.txt"
    monkeypatch.setenv(MARKER_ENV, str(marker))
    evil = tmp_path / "evil.pt"
    torch.save({"format": "cxrloc-checkpoint", "format_version": 1, "payload": Payload()}, evil)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="evil.pt: refused to load"):
        load_checkpoint(evil)
    with pytest.raises(CheckpointError, match="refused"):
        load_model(evil)
    assert not marker.exists()
    torch.load(evil, weights_only=False)  # control: the payload does run when unpickled unsafely
    assert marker.exists()


def test_non_plain_extra_is_refused_at_save(tmp_path):
    cfg = tiny_cfg()
    path = tmp_path / "bad.pt"
    with pytest.raises(CheckpointError, match="plain types only.*PosixPath"):
        save_checkpoint(path, build_model(cfg.model), cfg, 0, None, extra={"obj": Path("x")})
    assert not path.exists() and not list(tmp_path.iterdir())
