"""`cxrloc evaluate --predictions`: another model's scores (and maps), scored with the same protocol."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from cxrloc.cli import main
from cxrloc.evaluate.external import finding_of_column, read_maps
from cxrloc.evaluate.runner import Predictions
from cxrloc.labels import FINDINGS


def _export_run(eval_dir, out_dir, rng, extra_rows: int = 3):
    """The checkpoint run's own outputs, written as another model would: a CSV in another row order with NIH's
    image column, differently spelled and extra columns, rows of images outside the split; maps as an .npz."""
    preds = Predictions.load(eval_dir / "predictions.npz")
    out_dir.mkdir(parents=True, exist_ok=True)
    cols = {f: preds.probs[:, c] for c, f in enumerate(FINDINGS)}
    cols["Pleural Thickening"] = cols.pop("Pleural_Thickening")
    cols["infiltrate"] = cols.pop("Infiltration")
    paths = [f"/data/nih/images_{i % 3:03d}/images/{name}" for i, name in enumerate(preds.image_ids)]  # matched by name
    df = pd.DataFrame({"Image Index": paths, **cols, "Fracture": 0.5, "Lung Opacity": 0.1})
    extra = pd.DataFrame({c: [df[c].iloc[0]] * extra_rows for c in df.columns})
    extra["Image Index"] = [f"9999999{i}_000.png" for i in range(extra_rows)]
    df = pd.concat([df, extra]).iloc[rng.permutation(len(df) + extra_rows)]
    df.to_csv(out_dir / "scores.csv", index=False, float_format="%.9g")
    ids = preds.image_ids[preds.map_index]
    np.savez(out_dir / "maps.npz", image_ids=ids, maps=preds.maps * 7.0 + 3.0)  # another scale: normalised on reading
    return preds, out_dir / "scores.csv", out_dir / "maps.npz"


def test_the_models_own_outputs_score_exactly_like_the_checkpoint(evaluated, tmp_path, capsys):
    tmp, (_, dlrv) = evaluated
    preds, scores, maps = _export_run(dlrv, tmp_path / "files", np.random.default_rng(0))
    out = tmp_path / "ext"
    assert main(["evaluate", "--predictions", str(scores), "--maps", str(maps), "--name", "mine", "--data",
                 str(tmp / "cache"), "--out", str(out), "--bootstrap", "20", "--examples", "1", "--cv-folds", "4"]) == 0
    printed = capsys.readouterr().out
    assert "scored mine" in printed and "ignored columns: Fracture, Lung Opacity" in printed
    ours, theirs = json.loads((out / "metrics.json").read_text()), json.loads((dlrv / "metrics.json").read_text())
    assert ours["variant"] == "external" and ours["predictions"]["rows_not_in_split"] == 3
    for f in FINDINGS:
        assert ours["classification"]["per_finding"][f]["auc"] == pytest.approx(
            theirs["classification"]["per_finding"][f]["auc"], abs=1e-6, nan_ok=True), f
    assert ours["localization"]["available"]
    for kind in ("fixed", "cross_validated"):
        assert ours["localization"][kind]["iou"] == theirs["localization"][kind]["iou"], kind
    assert "Scores of `mine`" in (out / "report.md").read_text() and (out / "examples.png").exists()
    # and `cxrloc compare` pairs it with the checkpoint's run: a difference of exactly zero
    assert main(["compare", str(dlrv), str(out), "--out", str(tmp_path / "cmp"), "--resamples", "50"]) == 0
    doc = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert doc["reference"] == "dlrv" and doc["runs"][1]["name"] == "mine" and doc["runs"][1]["variant"] == "external"
    d = doc["differences"]["mine"]
    assert abs(d["auc"]["value"]) < 1e-6 and d["loc@0.3"]["value"] == 0.0 and d["loc@0.3"]["low"] == 0.0


def test_scores_without_maps_give_auc_only(evaluated, tmp_path, capsys):
    tmp, (_, dlrv) = evaluated
    _, scores, _ = _export_run(dlrv, tmp_path / "files", np.random.default_rng(1))
    out = tmp_path / "ext"
    assert main(["evaluate", "--predictions", str(scores), "--data", str(tmp / "cache"), "--out", str(out),
                 "--bootstrap", "0"]) == 0
    assert "localization: not computed (the predictions have no maps" in capsys.readouterr().out
    m = json.loads((out / "metrics.json").read_text())
    assert not m["localization"]["available"] and m["predictions"]["name"] == "scores"
    assert main(["compare", str(dlrv), str(out), "--out", str(tmp_path / "cmp"), "--resamples", "20"]) == 0
    doc = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert doc["differences"]["scores"]["loc@0.3"]["value"] is None


def test_column_names():
    assert finding_of_column(" pleural thickening ") == "Pleural_Thickening"
    assert finding_of_column("Infiltrate") == "Infiltration" and finding_of_column("EFFUSION") == "Effusion"
    assert finding_of_column("Lung Opacity") is None and finding_of_column("No Finding") is None


def test_bad_files_are_one_line_errors_naming_the_problem(evaluated, tmp_path, capsys):
    tmp, (_, dlrv) = evaluated
    preds, scores, maps = _export_run(dlrv, tmp_path / "files", np.random.default_rng(2), extra_rows=0)
    base = ["evaluate", "--data", str(tmp / "cache"), "--out", str(tmp_path / "o"), "--bootstrap", "0"]
    df = pd.read_csv(scores)

    def fails(frame: pd.DataFrame, message: str, *extra: str) -> None:
        path = tmp_path / "bad.csv"
        frame.to_csv(path, index=False)
        assert main([*base, "--predictions", str(path), *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err

    fails(df.drop(columns=["Hernia"]), "bad.csv: no column for Hernia (all 14 findings are needed)")
    fails(df.rename(columns={"Image Index": "path"}), "no image column (expected one of image_id, Image Index, file)")
    fails(pd.concat([df, df.iloc[:1]]), "has 2 rows")
    bad = df.copy()
    bad["Mass"] = bad["Mass"].astype(object)
    bad.loc[bad.index[4], "Mass"] = "high"
    fails(bad, "line 6, column Mass: 'high' is not a finite number")
    fails(df.iloc[1:], "no row for 1 of the 32 test images")
    fails(df.assign(Effusion2=df["Effusion"]).rename(columns={"Effusion2": "effusion"}), "two columns name Effusion")
    np.savez(tmp_path / "few.npz", image_ids=preds.image_ids[preds.map_index][1:], maps=preds.maps[1:])
    fails(df, "few.npz: no map for 1 of the 16 box images", "--maps", str(tmp_path / "few.npz"))
    np.savez(tmp_path / "shape.npz", image_ids=preds.image_ids[preds.map_index], maps=preds.maps[:, :13])
    fails(df, "maps must be (M, 14, h, w)", "--maps", str(tmp_path / "shape.npz"))
    (tmp_path / "junk.npz").write_bytes(b"junk")
    fails(df, "junk.npz: not a readable .npz", "--maps", str(tmp_path / "junk.npz"))
    assert main([*base, "--predictions", str(tmp_path / "missing.csv")]) == 2
    assert "missing.csv: predictions file not found" in capsys.readouterr().err
    assert main([*base, "--checkpoint", str(tmp / "dlrv.pt"), "--maps", str(maps)]) == 2
    assert "--maps and --name go with --predictions" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: one source only
        main([*base, "--checkpoint", str(tmp / "dlrv.pt"), "--predictions", str(scores)])


def test_maps_in_another_finding_order_and_scale(tmp_path, rng):
    maps = rng.random((3, 14, 5, 6)).astype(np.float32)
    order = list(reversed(FINDINGS))
    np.savez(tmp_path / "m.npz", image_ids=np.array(["a", "b", "c"]), maps=maps[:, ::-1] * 5 - 2,
             findings=np.array(order))
    ids, got = read_maps(tmp_path / "m.npz")
    lo = maps.min(axis=(2, 3), keepdims=True)
    want = (maps - lo) / (maps.max(axis=(2, 3), keepdims=True) - lo)
    assert ids.tolist() == ["a", "b", "c"]
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert got.min() == 0.0 and got.max() == 1.0


def test_cxrloc_predict_tables_score_like_evaluate(evaluated, tmp_path, capsys):
    """The loop a user can take: `cxrloc predict --save-maps` on image files, then `cxrloc evaluate --predictions`
    with its predictions.csv and maps.npz, gives the numbers of `cxrloc evaluate --checkpoint` on the cache."""
    from PIL import Image

    from cxrloc.data.cache import Cache

    tmp, (_, dlrv) = evaluated
    cache = Cache(tmp / "cache")
    pngs = tmp_path / "pngs"
    pngs.mkdir()
    for row in cache.indices("test"):  # the cache's own pixels as files: predict decodes them unchanged
        Image.fromarray(np.asarray(cache.images[row])).save(pngs / str(cache.image_ids[row]))
    size = str(cache.images.shape[1])
    assert main(["predict", "--checkpoint", str(tmp / "dlrv.pt"), str(pngs), "--out", str(tmp_path / "pred"),
                 "--decode-size", size, "--save-maps", "--no-overlays", "--device", "cpu", "--workers", "0"]) == 0
    table = pd.read_csv(tmp_path / "pred" / "predictions.csv")
    doc = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    assert list(table.columns) == ["file", "width", "height", *FINDINGS] and doc["files"]["maps"] == "maps.npz"
    assert table["file"].tolist() == [im["file"] for im in doc["images"]]
    np.testing.assert_array_equal(table[list(FINDINGS)].to_numpy(),
                                  [[im["probabilities"][f] for f in FINDINGS] for im in doc["images"]])
    out = tmp_path / "ext"
    assert main(["evaluate", "--predictions", str(tmp_path / "pred" / "predictions.csv"), "--maps",
                 str(tmp_path / "pred" / "maps.npz"), "--data", str(tmp / "cache"), "--out", str(out),
                 "--bootstrap", "20", "--examples", "0", "--cv-folds", "4"]) == 0
    assert "ignored columns: width, height" in capsys.readouterr().out
    ours, theirs = json.loads((out / "metrics.json").read_text()), json.loads((dlrv / "metrics.json").read_text())
    for f in FINDINGS:
        assert ours["classification"]["per_finding"][f]["auc"] == pytest.approx(
            theirs["classification"]["per_finding"][f]["auc"], abs=1e-6, nan_ok=True), f
    for kind in ("fixed", "cross_validated"):
        assert ours["localization"][kind]["iou"] == theirs["localization"][kind]["iou"], kind
