"""`cxrloc evaluate` end to end with a tiny random model: predictions cache, reuse, outputs."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

import cxrloc.evaluate.runner as runner
from cxrloc.cli import main
from cxrloc.config import load_config
from cxrloc.data.cache import Cache, write_cache
from cxrloc.data.transforms import batch_transform
from cxrloc.evaluate.runner import Predictions, run_predictions
from cxrloc.labels import FINDINGS
from cxrloc.model import build_model, save_checkpoint

SIZE = 64


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evalcmd")
    torch.manual_seed(0)
    cfg = load_config("dlrv", ["model.backbone=densenet-tiny", "model.pretrained=false", f"data.image_size={SIZE}"])
    model = build_model(cfg.model, use_region=cfg.loss.use_rv)
    save_checkpoint(tmp / "model.pt", model, cfg, epoch=1, metric=0.5)
    rng = np.random.default_rng(0)
    n = 30
    ids = [f"{i:08d}_000.png" for i in range(n)]
    index = pd.DataFrame({"image_id": ids, "patient_id": np.arange(n) // 3, "split": ["test"] * 24 + ["train"] * 6,
                          "orig_width": 1024, "orig_height": [1024] * 20 + [900] * 10})
    labels = (rng.random((n, 14)) < 0.4).astype(np.uint8)
    labels[:2] = [[1] * 14, [0] * 14]
    for j, name in enumerate(FINDINGS):
        index[name] = labels[:, j]
    rows = [(ids[i], ["Atelectasis", "Infiltrate", "Mass", "Nodule"][i % 4], 100.0 + 20 * i, 200.0, 150.0, 120.0)
            for i in range(12)]
    rows.append((ids[27], "Mass", 10.0, 10.0, 50.0, 50.0))  # a train image: not part of the test split
    boxes = pd.DataFrame(rows, columns=["image_id", "finding", "x", "y", "w", "h"])
    write_cache(tmp / "cache", rng.integers(0, 256, (n, 48, 48), dtype=np.uint8), index, boxes)
    return tmp, model, cfg


def test_run_predictions_matches_the_model(setup):
    tmp, model, cfg = setup
    cache = Cache(tmp / "cache")
    preds = run_predictions(model, cache, "test", cfg.data, batch_size=7, progress=False)
    rows = cache.indices("test")
    x = batch_transform(torch.from_numpy(np.asarray(cache.images[rows])), cfg.data)
    ref = model.eval().predict(x)
    np.testing.assert_allclose(preds.probs, ref["probs"].numpy(), atol=1e-5)
    assert preds.map_index.tolist() == list(range(12))  # box images of the test split only
    np.testing.assert_allclose(preds.maps, ref["cam_grid"][:12].numpy(), atol=1e-5)
    assert preds.orig_sizes[21].tolist() == [1024, 900] and preds.patient_ids[5] == 1


def test_evaluate_command_writes_outputs_and_reuses_predictions(setup, monkeypatch, capsys):
    tmp, _, _ = setup
    out = tmp / "eval"
    args = ["evaluate", "--checkpoint", str(tmp / "model.pt"), "--data", str(tmp / "cache"), "--out", str(out),
            "--device", "cpu", "--bootstrap", "20", "--batch-size", "8"]
    assert main(args) == 0
    assert "computed predictions for 24 images" in capsys.readouterr().out
    for name in ("predictions.npz", "metrics.json", "report.md", "report.html", "roc_curves.png",
                 "localization_accuracy.png", "examples.png"):
        assert (out / name).exists(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_images"] == 24 and metrics["localization"]["num_boxes"] == 12
    assert metrics["localization"]["box_mode"] == "max_component"
    assert metrics["checkpoint"]["epoch"] == 1 and len(metrics["checkpoint"]["sha256"]) == 64
    assert metrics["config"]["eval"]["bootstrap"] == 20

    def must_not_run(*a, **k):
        raise AssertionError("the network ran although predictions.npz matches")

    monkeypatch.setattr(runner, "run_predictions", must_not_run)
    assert main([*args, "--box-mode", "components", "--map-threshold", "0.3", "--set", "eval.cv_folds=5"]) == 0
    assert "reused predictions" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["localization"]["box_mode"] == "components"
    assert metrics["localization"]["fixed"]["cam_threshold"] == 0.3
    assert len(metrics["localization"]["cross_validated"]["chosen_thresholds"]) == 5


def test_other_checkpoint_recomputes(setup, capsys):
    tmp, model, cfg = setup
    out = tmp / "eval2"
    base = ["evaluate", "--data", str(tmp / "cache"), "--out", str(out), "--device", "cpu", "--bootstrap", "0",
            "--examples", "0"]
    assert main([*base, "--checkpoint", str(tmp / "model.pt")]) == 0
    save_checkpoint(tmp / "other.pt", model, cfg, epoch=2, metric=0.6)
    assert main([*base, "--checkpoint", str(tmp / "other.pt")]) == 0
    assert "computed predictions" in capsys.readouterr().out.split("report:")[1]
    assert Predictions.load(out / "predictions.npz").meta["checkpoint"]["path"].endswith("other.pt")
    assert not (out / "examples.png").exists()


def test_bad_arguments_are_one_line_errors(setup, capsys):
    tmp, _, _ = setup
    base = ["evaluate", "--data", str(tmp / "cache"), "--out", str(tmp / "e3"), "--device", "cpu"]
    assert main([*base, "--checkpoint", str(tmp / "missing.pt")]) == 2
    assert "missing.pt: checkpoint not found" in capsys.readouterr().err
    assert main([*base, "--checkpoint", str(tmp / "model.pt"), "--set", "loss.margin=1"]) == 2
    assert "only eval fields" in capsys.readouterr().err
    assert main([*base, "--checkpoint", str(tmp / "model.pt"), "--box-mode", "all", "--map-threshold", "1.5"]) == 2
    assert "map_threshold" in capsys.readouterr().err


def test_hflip_tta_is_recorded_and_changes_the_predictions(setup, capsys):
    """``eval.hflip_tta`` (ours): predictions made without it are not reused with it, and vice versa."""
    tmp, model, cfg = setup
    out = tmp / "eval_tta"
    base = ["evaluate", "--checkpoint", str(tmp / "model.pt"), "--data", str(tmp / "cache"), "--out", str(out),
            "--device", "cpu", "--bootstrap", "0", "--examples", "0"]
    assert main(base) == 0
    plain = Predictions.load(out / "predictions.npz")
    assert main([*base, "--set", "eval.hflip_tta=true"]) == 0
    assert "computed predictions" in capsys.readouterr().out.split("report:")[1]
    tta = Predictions.load(out / "predictions.npz")
    assert tta.meta["hflip_tta"] is True and plain.meta["hflip_tta"] is False
    cache = Cache(tmp / "cache")
    x = batch_transform(torch.from_numpy(np.asarray(cache.images[cache.indices("test")])), cfg.data)
    ref = model.eval().predict(x, hflip_tta=True)
    np.testing.assert_allclose(tta.probs, ref["probs"].numpy(), atol=1e-5)
    np.testing.assert_allclose(tta.maps, ref["cam_grid"][:12].numpy(), atol=1e-4)  # channels_last rounding
    assert not np.allclose(tta.maps, plain.maps, atol=1e-3)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["eval"]["hflip_tta"] is True and metrics["localization"]["hflip_tta"] is True
    assert "mirrored image" in (out / "report.md").read_text()
