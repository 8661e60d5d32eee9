"""`cxrloc compare`: runs side by side and paired bootstrap differences (synthetic predictions, then the CLI)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from cxrloc.cli import main
from cxrloc.config import Config, EvalConfig
from cxrloc.data.cache import write_cache
from cxrloc.evaluate.boxes import area_coverage_grid
from cxrloc.evaluate.compare import (
    TABLE3_TS,
    Difference,
    EvaluatedRun,
    _mean_of_findings,
    compare_runs,
    headline,
    load_runs,
    pick_reference,
    protocol_differences,
    seed_groups,
)
from cxrloc.evaluate.compare_report import comparison_sections
from cxrloc.evaluate.runner import Predictions
from cxrloc.evaluate.scoring import evaluate_predictions
from cxrloc.labels import BOX_FINDINGS, FINDINGS

N, N_BOX = 120, 48
EVAL = EvalConfig(bootstrap=50, cv_folds=4)
META = {"split": "test", "cache": {"root": "cache", "sha256": {"images.npy": "ab" * 32}}}


def _truth(seed: int = 0) -> tuple[np.ndarray, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    labels = (rng.random((N, 14)) < 0.3).astype(np.uint8)
    rows = []
    for i in range(N_BOX):
        x, y = rng.uniform(50, 600, 2)
        rows.append((f"{i:08d}_000.png", BOX_FINDINGS[i % 8], x, y, rng.uniform(150, 350), rng.uniform(150, 350)))
    return labels, pd.DataFrame(rows, columns=["image_id", "finding", "x", "y", "w", "h"])


def _predictions(labels: np.ndarray, boxes: pd.DataFrame, skill: float, seed: int) -> Predictions:
    """Scores with ``skill`` weight on the labels; maps mix the true box with noise by the same weight."""
    rng = np.random.default_rng(seed)
    probs = np.clip(skill * labels + (1 - skill) * rng.random(labels.shape), 0, 1).astype(np.float32)
    maps = rng.random((N_BOX, 14, 14, 14)).astype(np.float32)
    for i, r in enumerate(boxes.itertuples()):
        oracle = area_coverage_grid(np.array([r.x, r.y, r.w, r.h]), (1024, 1024), (14, 14))
        maps[i, FINDINGS.index(r.finding)] = skill * oracle + (1 - skill) * maps[i, FINDINGS.index(r.finding)]
    return Predictions(
        image_ids=np.array([f"{i:08d}_000.png" for i in range(N)]), patient_ids=np.arange(N) // 2, rows=np.arange(N),
        labels=labels, probs=probs, logits=probs, orig_sizes=np.full((N, 2), 1024), map_index=np.arange(N_BOX),
        maps=maps, meta=dict(META),
    )


def _run(name: str, preds: Predictions, boxes: pd.DataFrame, variant: str = "dlrv") -> EvaluatedRun:
    metrics = evaluate_predictions(preds, boxes, EVAL, progress=False).metrics
    metrics = {**metrics, "variant": variant, "config": {"eval": Config(eval=EVAL).to_dict()["eval"]},
               "checkpoint": {"config_name": name}}
    return EvaluatedRun(name, Path(name), metrics, preds)


def _shuffled(preds: Predictions, seed: int) -> Predictions:
    """The same predictions in another image order, maps stored in another order too."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(N)  # new position j holds old image perm[j]
    inverse = np.argsort(perm)
    mperm = rng.permutation(N_BOX)
    return replace(preds, image_ids=preds.image_ids[perm], patient_ids=preds.patient_ids[perm], rows=preds.rows[perm],
                   labels=preds.labels[perm], probs=preds.probs[perm], logits=preds.logits[perm],
                   orig_sizes=preds.orig_sizes[perm], maps=preds.maps[mperm], map_index=inverse[preds.map_index[mperm]],
                   _pos=None, _map_pos=None)  # the lookup caches belong to the old order


@pytest.fixture(scope="module")
def runs():
    labels, boxes = _truth()
    weak = _predictions(labels, boxes, skill=0.25, seed=1)
    strong = _predictions(labels, boxes, skill=0.6, seed=2)
    return boxes, _run("weak", weak, boxes, "baseline"), _run("strong", strong, boxes, "dlrv")


def test_identical_runs_differ_by_exactly_zero(runs):
    boxes, weak, _ = runs
    twin = replace(weak, name="twin", folder=Path("twin"))
    comp = compare_runs([weak, twin], boxes, reference="weak", resamples=200)
    for d in [*comp.differences["twin"].values(), *comp.finding_differences["twin"].values()]:
        if np.isfinite(d.value):
            assert (d.value, d.low, d.high) == (0.0, 0.0, 0.0) and d.verdict == "within noise"


def test_image_order_does_not_change_the_comparison(runs):
    """Resamples are drawn by patient id: a copy in another image order (maps stored in another order too) pairs the same."""
    boxes, weak, strong = runs
    a = compare_runs([weak, strong], boxes, reference="strong", resamples=200)
    shuffled = replace(weak, predictions=_shuffled(weak.predictions, seed=5))
    b = compare_runs([shuffled, strong], boxes, reference="strong", resamples=200)
    for key, d in a.differences["weak"].items():
        e = b.differences["weak"][key]
        assert (e.value, e.low, e.high) == pytest.approx((d.value, d.low, d.high), abs=1e-12), key
    for f, d in a.finding_differences["weak"].items():
        e = b.finding_differences["weak"][f]
        assert e.value == pytest.approx(d.value, abs=1e-12, nan_ok=True)


def test_points_agree_with_each_runs_own_metrics_and_sklearn(runs):
    boxes, weak, strong = runs
    comp = compare_runs([weak, strong], boxes, reference="strong", resamples=200)
    d = comp.differences["weak"]
    hw, hs = headline(weak.metrics), headline(strong.metrics)
    assert d["auc"].value == pytest.approx(hw["mean_auc"] - hs["mean_auc"], abs=1e-9)
    for t in TABLE3_TS:  # the recomputed out-of-fold box accuracy is evaluate's Table 2 mean
        assert d[f"loc@{t}"].value == pytest.approx(hw["box_accuracy_mean"][t] - hs["box_accuracy_mean"][t], abs=1e-9), t
    for c, f in enumerate(FINDINGS):
        y = weak.predictions.labels[:, c]
        want = roc_auc_score(y, weak.predictions.probs[:, c]) - roc_auc_score(y, strong.predictions.probs[:, c])
        assert comp.finding_differences["weak"][f].value == pytest.approx(want, abs=1e-9), f


def test_a_clearly_better_run_is_told_apart(runs):
    boxes, weak, strong = runs
    comp = compare_runs([weak, strong], boxes, reference="strong", resamples=300)
    auc = comp.differences["weak"]["auc"]
    assert auc.value < 0 and auc.high < 0 and auc.verdict == "worse"
    assert comp.differences["weak"]["loc@0.3"].verdict == "worse"
    flipped = compare_runs([weak, strong], boxes, reference="weak", resamples=300)
    assert flipped.differences["strong"]["auc"].verdict == "better"
    assert flipped.differences["strong"]["auc"].value == pytest.approx(-auc.value)


def test_paired_difference_of_box_accuracy() -> None:
    """Mean-of-findings accuracy difference, by hand: findings 0 and 1, unit weights."""
    a = np.array([1, 1, 0, 1], dtype=float)  # finding 0: 2/2, finding 1: 1/2
    b = np.array([1, 0, 0, 0], dtype=float)  # finding 0: 1/2, finding 1: 0/2
    fidx = np.array([0, 0, 1, 1])
    diff = _mean_of_findings(a, b, np.ones((1, 4)), fidx, 2)
    assert diff.shape == (1,) and diff[0] == pytest.approx(((1 - 0.5) + (0.5 - 0.0)) / 2)
    # a resample that drops finding 1's boxes leaves the mean over finding 0 only
    diff = _mean_of_findings(a, b, np.array([[1.0, 1.0, 0.0, 0.0]]), fidx, 2)
    assert diff[0] == pytest.approx(0.5)
    assert Difference(0.01, -0.02, 0.04, True).within_noise
    assert not Difference(-0.05, -0.08, -0.01, False).within_noise


def test_reference_choice(runs):
    _, weak, strong = runs
    assert pick_reference([weak, strong], None) == "strong"  # the one full-DLRV run
    assert pick_reference([weak, strong], "weak") == "weak"
    other = replace(weak, name="other", metrics={**weak.metrics, "variant": "dlrv"})
    assert pick_reference([weak, other, strong], None) == "weak"  # two DLRV runs: the first run
    with pytest.raises(ValueError, match="none of the runs: weak, strong"):
        pick_reference([weak, strong], "nope")


def test_sections_show_runs_papers_rows_and_verdicts(runs):
    boxes, weak, strong = runs
    comp = compare_runs([weak, strong], boxes, reference="strong", resamples=100)
    sections = comparison_sections(comp, labels={"strong": "DLRV (full)"}, notes=["a note"])
    titles = [s["title"] for s in sections]
    assert titles[0].startswith("Table 1") and titles[1].startswith("Table 3") and "DLRV (full)" in titles[2]
    t1 = [r[0] for r in sections[0]["rows"]]
    assert t1 == ["weak", "DLRV (full)", "paper: DenseNet-121 baseline", "paper: DLRV"]
    assert sections[0]["rows"][3][-2] == "0.855"
    assert "a note" in sections[2]["text"] and sections[2]["rows"][0][1].endswith("worse")
    assert [r[0] for r in sections[3]["rows"]] == list(FINDINGS)


def _write_run(folder: Path, run: EvaluatedRun, **meta) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    replace(run.predictions, meta={**run.predictions.meta, **meta}).save(folder / "predictions.npz")
    (folder / "metrics.json").write_text(json.dumps(run.metrics))
    return folder


def test_runs_of_other_test_sets_are_refused(runs, tmp_path):
    _, weak, strong = runs
    a = _write_run(tmp_path / "a", weak)
    assert [r.name for r in load_runs([a, _write_run(tmp_path / "b", strong)])] == ["weak", "strong"]
    twins = load_runs([a, _write_run(tmp_path / "c", weak)])  # one config twice (seeds): one group
    assert [(r.name, r.group) for r in twins] == [("weak (a)", "weak"), ("weak (c)", "weak")]
    seeds = load_runs([_write_run(tmp_path / f"s{k}" / "eval", weak) for k in range(2)])  # same folder names
    assert [(r.name, r.group) for r in seeds] == [(f"weak ({tmp_path / f's{k}' / 'eval'})", "weak") for k in range(2)]
    with pytest.raises(ValueError, match=r"val_run: evaluated on split 'val'"):
        load_runs([a, _write_run(tmp_path / "val_run", strong, split="val")])
    # another cache of the same images (e.g. another size): compared, and the report names the other cache
    other_cache = _write_run(tmp_path / "other_cache", strong, cache={"root": "x", "sha256": {"images.npy": "cd"}})
    assert protocol_differences(load_runs([a, other_cache])) == {"cache": {"weak": "cache", "strong": "x"}}
    relabelled = replace(strong, predictions=replace(strong.predictions, labels=1 - strong.predictions.labels))
    with pytest.raises(ValueError, match=r"relabelled: the labels of its images differ from those of"):
        load_runs([a, _write_run(tmp_path / "relabelled", relabelled)])
    moved = replace(strong, predictions=replace(strong.predictions, patient_ids=strong.predictions.patient_ids[::-1]))
    with pytest.raises(ValueError, match=r"moved: the patients of its images differ"):
        load_runs([a, _write_run(tmp_path / "moved", moved)])
    fewer = replace(strong, predictions=replace(strong.predictions, image_ids=strong.predictions.image_ids.copy()))
    fewer.predictions.image_ids[0] = "99999999_000.png"
    with pytest.raises(ValueError, match=r"fewer: 2 images differ"):
        load_runs([a, _write_run(tmp_path / "fewer", fewer)])
    with pytest.raises(ValueError, match="at least two"):
        load_runs([a])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty: no metrics.json"):
        load_runs([a, tmp_path / "empty"])
    bad = _write_run(tmp_path / "bad", strong)
    (bad / "metrics.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"bad.metrics.json: not valid JSON"):
        load_runs([a, bad])
    with pytest.raises(ValueError, match="3 names for 2 folders"):
        load_runs([a, bad], names=["x", "y", "z"])


# --------------------------------------------------------------------------- the command, on evaluated tiny models


def test_compare_command_writes_the_report(evaluated, capsys):
    tmp, folders = evaluated
    out = tmp / "cmp"
    capsys.readouterr()
    assert main(["compare", *map(str, folders), "--out", str(out), "--resamples", "100"]) == 0
    printed = capsys.readouterr().out
    assert "reference dlrv" in printed and "baseline: mean AUC" in printed
    for name in ("compare.md", "compare.html", "compare.json", "differences.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "differences.png").read_bytes()[:4] == b"\x89PNG"
    doc = json.loads((out / "compare.json").read_text(), parse_constant=lambda c: pytest.fail(f"compare.json holds {c}"))
    assert doc["reference"] == "dlrv" and [r["name"] for r in doc["runs"]] == ["baseline", "dlrv"]
    assert doc["test_set"]["images"] == 32 and doc["test_set"]["boxes"] == 16
    assert doc["protocol_differences"] == {}
    m = {f.name: json.loads((f / "metrics.json").read_text())["classification"]["mean_auc"] for f in folders}
    assert doc["differences"]["baseline"]["auc"]["value"] == pytest.approx(m["baseline"] - m["dlrv"], abs=1e-9)
    assert set(doc["differences"]["baseline"]) == {"auc", *(f"loc@{t}" for t in TABLE3_TS)}
    md = (out / "compare.md").read_text()
    assert "Table 1 layout" in md and "paper: DLRV" in md and "paper: DenseNet-121 baseline" in md
    assert "<title>cxrloc compare</title>" in (out / "compare.html").read_text()
    # named runs, the other reference
    assert main(["compare", *map(str, folders), "--out", str(out), "--resamples", "50", "--names", "B,D",
                 "--reference", "B"]) == 0
    doc = json.loads((out / "compare.json").read_text())
    assert doc["reference"] == "B" and set(doc["differences"]) == {"D"}


def test_compare_command_checks_the_cache(evaluated, tmp_path, capsys):
    tmp, folders = evaluated
    other = tmp_path / "other_cache"
    rng = np.random.default_rng(1)
    index = pd.DataFrame({"image_id": ["00000001_000.png"], "patient_id": [1], "split": ["test"],
                          "orig_width": 1024, "orig_height": 1024, **{f: [0] for f in FINDINGS}})
    write_cache(other, rng.integers(0, 256, (1, 48, 48), dtype=np.uint8), index,
                pd.DataFrame(columns=["image_id", "finding", "x", "y", "w", "h"]))
    assert main(["compare", *map(str, folders), "--out", str(tmp_path / "o"), "--data", str(other)]) == 2
    assert "not a cache the runs were scored on" in capsys.readouterr().err
    assert main(["compare", *map(str, folders), "--out", str(tmp_path / "o"), "--data", str(tmp_path / "nope")]) == 2
    assert "pass --data CACHE" in capsys.readouterr().err


def test_runs_scored_differently_are_compared_with_a_note(evaluated, tmp_path):
    """One checkpoint scored with two box modes: a legitimate comparison, but the report says what differs."""
    tmp, folders = evaluated
    other = tmp_path / "dlrv_all"
    assert main(["evaluate", "--checkpoint", str(tmp / "dlrv.pt"), "--data", str(tmp / "cache"), "--out", str(other),
                 "--device", "cpu", "--bootstrap", "20", "--examples", "0", "--cv-folds", "4", "--box-mode", "all"]) == 0
    out = tmp_path / "cmp"
    assert main(["compare", str(folders[1]), str(other), "--out", str(out), "--resamples", "50",
                 "--names", "max_component,all"]) == 0
    doc = json.loads((out / "compare.json").read_text())
    assert doc["protocol_differences"] == {"box_mode": {"max_component": "max_component", "all": "all"}}
    assert abs(doc["differences"]["all"]["auc"]["value"]) < 1e-12  # same scores: only the boxes differ
    assert "**Scored differently**: `box_mode` is max_component for max_component, all for all" in (out / "compare.md").read_text()


def test_runs_of_one_config_show_their_spread(runs):
    """Seeds: runs sharing a group get mean, sample SD, min and max of their headline numbers."""
    boxes, weak, strong = runs
    seed0 = replace(weak, name="cfg (s0)", group="cfg")
    seed1 = replace(strong, name="cfg (s1)", group="cfg", metrics={**strong.metrics, "variant": "baseline"})
    single = replace(strong, name="single", folder=Path("single"))
    comp = compare_runs([seed0, seed1, single], boxes, reference="single", resamples=50)
    groups = seed_groups(comp)
    assert list(groups) == ["cfg"] and groups["cfg"]["runs"] == ["cfg (s0)", "cfg (s1)"]
    a, b = headline(weak.metrics)["mean_auc"], headline(strong.metrics)["mean_auc"]
    got = groups["cfg"]["mean_auc"]
    assert got["mean"] == pytest.approx((a + b) / 2) and got["sd"] == pytest.approx(abs(a - b) / np.sqrt(2))
    assert (got["min"], got["max"], got["n"]) == (min(a, b), max(a, b), 2)
    sections = comparison_sections(comp)
    assert sections[-1]["title"].startswith("Across runs of one config") and sections[-1]["rows"][0][:2] == ["cfg", "2"]
    assert not seed_groups(compare_runs([weak, strong], boxes, resamples=20))


def test_the_readme_comparison_example_runs(evaluated, capsys):
    """The README's "Python API" comparison example, as written (only the paths swapped in)."""
    import re

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    code = re.findall(r"```python\n(.*?)```", section, flags=re.S)[2]
    tmp, (baseline, dlrv) = evaluated
    for old, new in (('"eval/baseline"', repr(str(baseline))), ('"eval/dlrv"', repr(str(dlrv))),
                     ('"cache-256"', repr(str(tmp / "cache"))), ("resamples=1000", "resamples=50")):
        assert old in code, f"the README example no longer contains {old!r}"
        code = code.replace(old, new)
    ns: dict = {}
    exec(compile(code, "README.md (comparison example)", "exec"), ns)
    assert ns["comparison"].reference == "dlrv" and ns["d"].verdict in ("better", "worse", "within noise")
    assert capsys.readouterr().out.strip().endswith(ns["d"].verdict)


def test_box_accuracy_resamples_patients_not_images(runs):
    """All box images of one patient: every resample draws that patient's boxes together, so the box-accuracy
    difference cannot vary (an image-level bootstrap would vary it); the AUC difference still varies."""
    boxes, weak, strong = runs

    def one_box_patient(run: EvaluatedRun) -> EvaluatedRun:
        patients = run.predictions.patient_ids.copy()
        patients[:N_BOX] = 10_000
        return replace(run, predictions=replace(run.predictions, patient_ids=patients, _pos=None, _map_pos=None))

    comp = compare_runs([one_box_patient(weak), one_box_patient(strong)], boxes, reference="strong", resamples=200)
    d = comp.differences["weak"]
    for t in TABLE3_TS:
        assert d[f"loc@{t}"].low == pytest.approx(d[f"loc@{t}"].value) == pytest.approx(d[f"loc@{t}"].high), t
    assert d["loc@0.3"].value < 0 and d["auc"].low < d["auc"].high
