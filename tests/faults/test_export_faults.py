"""`cxrloc export` and `cxrloc predict --onnx` under faults: nothing half-written, clear one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cxrloc import export as export_mod
from cxrloc.cli import main


@pytest.fixture(scope="module")
def exported(reference_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("faults-export") / "export"
    assert main(["export", "--checkpoint", str(reference_run.run / "checkpoints/best.pt"), "--out", str(out),
                 "--input-size", "64"]) == 0
    return out


def test_a_runtime_that_disagrees_with_pytorch_writes_nothing(reference_run, tmp_path, monkeypatch, capsys):
    checkpoint = reference_run.run / "checkpoints/best.pt"
    monkeypatch.setattr(export_mod, "compare", lambda *a: {"probs": 0.0, "logits": 0.5, "cam_grid": 0.0})
    out = tmp_path / "out"
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(out), "--input-size", "64"]) == 2
    err = capsys.readouterr().err
    assert str(checkpoint) in err and "differs from PyTorch" in err and "nothing written" in err
    assert not out.exists() or not any(out.iterdir())


def test_a_missing_onnx_package_is_named_before_any_work(reference_run, tmp_path, monkeypatch):
    real = export_mod.importlib.import_module

    def fake(name, *a):
        if name == "onnxscript":
            raise ImportError("No module named 'onnxscript'")
        return real(name, *a)

    monkeypatch.setattr(export_mod.importlib, "import_module", fake)
    with pytest.raises(export_mod.ExportError, match=r"needs the package 'onnxscript': pip install"):
        export_mod.export_onnx(reference_run.run / "checkpoints/best.pt", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_corrupt_checkpoint_is_one_clear_line(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["export", "--checkpoint", str(bad), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cxrloc export: error:") and str(bad) in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage", ["truncated onnx", "missing metadata", "foreign metadata", "incomplete metadata"])
def test_predict_refuses_a_damaged_export(exported, synth_data, tmp_path, capsys, damage):
    copy = tmp_path / "export"
    shutil.copytree(exported, copy)
    if damage == "truncated onnx":
        (copy / "model.onnx").write_bytes((exported / "model.onnx").read_bytes()[:-10])
        expected = [str(copy / "model.onnx"), "SHA-256 differs"]
    elif damage == "missing metadata":
        (copy / "model.json").unlink()
        expected = [str(copy / "model.json"), "not a readable `cxrloc export` metadata file"]
    elif damage == "foreign metadata":
        (copy / "model.json").write_text('{"schema": "someone-else/1", "findings": []}')
        expected = [str(copy / "model.json"), "do not match this cxrloc"]
    else:
        meta = json.loads((exported / "model.json").read_text())
        del meta["thresholds"]
        (copy / "model.json").write_text(json.dumps(meta))
        expected = [str(copy / "model.json"), "incomplete `cxrloc export` metadata (KeyError"]
    image = next((synth_data / "images").glob("*.png"))
    assert main(["predict", "--onnx", str(copy), str(image), "--out", str(tmp_path / "pred")]) == 2
    err = capsys.readouterr().err
    assert all(e in err for e in expected), err
    assert not (tmp_path / "pred" / "predictions.json").exists()


def test_predict_refuses_settings_the_export_fixed(exported, synth_data, tmp_path, capsys):
    image = next((synth_data / "images").glob("*.png"))
    assert main(["predict", "--onnx", str(exported), str(image), "--out", str(tmp_path / "a"), "--bf16",
                 "--decode-size", "128"]) == 2
    assert "--decode-size, --bf16 are fixed by the export" in capsys.readouterr().err
    assert main(["predict", "--onnx", str(exported), str(image), "--out", str(tmp_path / "b")]) == 0  # and it works
