"""``cxrloc demo``: the end-to-end test (``--quick``), idempotent reruns, and the demo's helpers.

The end-to-end test runs the whole pipeline (synth -> prepare -> train -> evaluate -> predict ->
report) with the quick plan in a temporary folder and checks every stage's output and the
report. Margin above chance (stated): the quick DLRV's mean test AUC must exceed
0.5 + AUC_MARGIN (0.6) and the lower end of its patient-bootstrap 95% interval must exceed 0.5,
i.e. it learned the findings from image-level labels and it is not luck of the split (measured:
0.84 [0.78, 0.88] with seed 0). The quality targets of the default demo (mean AUC >= 0.90, box
accuracy at T = 0.3 >= 0.5) are measured by ``benchmarks/demo.py``, not here.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from cxrloc.cli import main
from cxrloc.config import load_config
from cxrloc.demo import (
    PLANS,
    STAMP,
    VARIANTS,
    _remove_stage_folder,
    busy_cores,
    cam_threshold_of,
    choose_threads,
    variant_config,
)

AUC_MARGIN = 0.1


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "quick"
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    return out


def test_quick_demo_end_to_end(quick_demo: Path) -> None:
    out = quick_demo
    for name in ("report.md", "report.html", "demo.json"):
        assert (out / name).is_file(), name
    doc = json.loads((out / "demo.json").read_text())
    assert [s["name"] for s in doc["stages"]] == ["synth", "prepare", "train dlrv", "evaluate dlrv", "predict"]
    assert all(s["status"] == "ran" for s in doc["stages"])
    res = doc["results"]["dlrv"]
    lo, hi = res["mean_auc_ci"]
    assert 0.0 <= lo <= res["mean_auc"] <= hi <= 1.0, res
    assert res["mean_auc"] > 0.5 + AUC_MARGIN, res
    assert lo > 0.5, res
    assert res["boxes"] > 0 and res["box_accuracy_mean"]["0.1"] is not None
    # every stage's output is where the report says
    assert (out / "synth" / "Data_Entry_2017.csv").is_file()
    assert (out / "cache" / "images.npy").is_file()
    assert (out / "train" / "dlrv" / "checkpoints" / "best.pt").is_file()
    assert (out / "evaluate" / "dlrv" / "metrics.json").is_file()
    assert doc["overlays"] and all(Path(p).is_file() for p in doc["overlays"])
    md = (out / "report.md").read_text()
    for needle in ("Time per stage", "Table 1", "Table 2", "T=0.3", "Where to look", f"{res['mean_auc']:.3f}"):
        assert needle in md, needle
    html = (out / "report.html").read_text()
    assert html.startswith("<!doctype html>") and "data:image/png;base64," in html


def test_quick_demo_rerun_reuses_every_stage(quick_demo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = json.loads((quick_demo / "demo.json").read_text())
    assert main(["demo", "--quick", "--out", str(quick_demo), "--no-progress"]) == 0
    doc = json.loads((quick_demo / "demo.json").read_text())
    assert [s["status"] for s in doc["stages"]] == ["reused"] * 5
    assert doc["results"] == before["results"]
    assert "reusing" in capsys.readouterr().out


def test_changed_seed_redoes_the_stages(tmp_path: Path) -> None:
    """A stamp with another key is not reused; a folder not written by the demo is never deleted."""
    out = tmp_path / "demo"
    stage = out / "synth"
    stage.mkdir(parents=True)
    (stage / "Data_Entry_2017.csv").write_text("x")
    (stage / STAMP).write_text(json.dumps({"key": "old"}))
    _remove_stage_folder(stage, out)
    assert not stage.exists()
    mine = out / "cache"
    mine.mkdir()
    (mine / "my_notes.txt").write_text("keep me")
    with pytest.raises(RuntimeError, match="not written by cxrloc demo"):
        _remove_stage_folder(mine, out)
    with pytest.raises(RuntimeError, match="not inside the demo folder"):
        _remove_stage_folder(tmp_path / "elsewhere", out)
    assert (mine / "my_notes.txt").read_text() == "keep me"


def test_ablation_variants_share_the_budget() -> None:
    plan = PLANS["default"]
    full = variant_config(plan, "dlrv", seed=3).to_dict()
    assert full["loss"]["use_dl"] and full["loss"]["use_rv"] and full["train"]["seed"] == 3
    for variant, (use_dl, use_rv) in VARIANTS.items():
        cfg = variant_config(plan, variant, seed=3)
        assert (cfg.loss.use_dl, cfg.loss.use_rv) == (use_dl, use_rv)
        assert cfg.variant == variant
        d = cfg.to_dict()
        for section in ("data", "model", "train", "mining", "eval"):
            assert d[section] == full[section], (variant, section)
    with pytest.raises(ValueError, match="unknown variant"):
        variant_config(plan, "dlrv_plus", seed=0)


def test_shipped_demo_configs_load() -> None:
    for plan in PLANS.values():
        cfg = load_config(plan.config)
        assert cfg.name == plan.config
        assert cfg.loss.use_dl and cfg.loss.use_rv  # the demo trains the full method
        assert cfg.model.pretrained is False  # nothing is downloaded


def test_choose_threads() -> None:
    assert choose_threads(3) == 3
    assert choose_threads(None) >= 1
    with pytest.raises(ValueError):
        choose_threads(0)
    cores = len(os.sched_getaffinity(0))
    assert choose_threads(None, busy=0.2) == cores  # an idle machine: every core
    assert choose_threads(None, busy=cores + 7.0) == 1  # a saturated one: one thread, never zero
    if cores >= 2:
        assert choose_threads(None, busy=1.0) == cores - 1


def test_busy_cores_measures_now() -> None:
    """Instantaneous, not the lagging load average: between 0 and the core count, and it sees a busy loop."""
    idle = busy_cores(0.2)
    assert 0.0 <= idle <= os.cpu_count() + 1e-6
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            pass

    t = threading.Thread(target=spin)
    t.start()
    try:
        loaded = busy_cores(0.3)
    finally:
        stop.set()
        t.join()
    assert loaded > 0.5, (idle, loaded)


def test_cam_threshold_of() -> None:
    m = {"localization": {"available": True, "cross_validated": {"chosen_thresholds": [0.3, 0.5, 0.4]},
                          "fixed": {"cam_threshold": 0.5}}}
    assert cam_threshold_of(m) == 0.4
    m["localization"]["cross_validated"] = None
    assert cam_threshold_of(m) == 0.5


def test_demo_backbone_grids() -> None:
    """densenet-small (the demo's backbone): 216 features; stride 8 gives a 16 x 16 grid at 128 px."""
    import torch

    from cxrloc.model.backbone import create_backbone

    x = torch.randn(1, 3, 128, 128)
    shapes = {}
    names = {}
    for stride in (32, 16, 8):
        module, k = create_backbone("densenet-small", output_stride=stride)
        with torch.no_grad():
            shapes[stride] = tuple(module.eval()(x).shape)
        names[stride] = list(module.state_dict())
        assert k == 216
    assert shapes == {32: (1, 216, 4, 4), 16: (1, 216, 8, 8), 8: (1, 216, 16, 16)}
    assert names[8] == names[16] == names[32]  # same parameters: checkpoints and weights load at any stride


def test_cam_offsets_tool_on_the_quick_demo(quick_demo: Path) -> None:
    """tools/cam_offsets.py (the analysis in docs/demo_tuning.md) reads an evaluated run and its cache."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    from cam_offsets import cam_offsets

    res = cam_offsets(quick_demo / "evaluate" / "dlrv", quick_demo / "cache")
    mean = res.pop("Mean")
    assert res and all(0.0 <= r["pointing"] <= 1.0 and r["boxes"] > 0 for r in res.values())
    assert all(r["acc_common"] <= r["acc_own"] + 1e-12 for r in res.values())  # own threshold is an upper bound
    assert mean["acc_common"] <= mean["acc_own"] + 1e-12
    from cxrloc.data.cache import Cache

    assert sum(r["boxes"] for r in res.values()) == len(Cache(quick_demo / "cache").boxes)  # every box counted once


def test_demo_panel_tool_on_the_quick_demo(quick_demo: Path, tmp_path: Path) -> None:
    """tools/demo_panel.py (the README's top picture): the first pair of each of the 8 rows, 2 x 4."""
    import sys

    import numpy as np
    from PIL import Image

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    from demo_panel import main

    src = quick_demo / "evaluate" / "dlrv" / "examples.png"
    assert main([str(src), str(tmp_path / "panel.png")]) == 0
    with Image.open(src) as ex, Image.open(tmp_path / "panel.png") as panel:
        row_h, half_w = ex.height // 8, ex.width // 2
        tw, th = round(half_w * 0.75), round(row_h * 0.75)
        assert panel.size == (4 * tw, 2 * th)
        # tile 5 (Nodule: second row, second column) is row 5's left pair, scaled
        ref = ex.convert("RGB").crop((0, 5 * row_h, half_w, 6 * row_h)).resize((tw, th), Image.LANCZOS)
        got = panel.crop((tw, th, 2 * tw, 2 * th))
        assert np.array_equal(np.asarray(got), np.asarray(ref))
