"""`cxrloc predict`: the real sample with a random tiny model, bad files, DICOM, safe output paths."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cxrloc.cli import main
from cxrloc.config import load_config
from cxrloc.evaluate.boxes import boxes_from_map
from cxrloc.labels import FINDINGS
from cxrloc.model import build_model, save_checkpoint
from cxrloc.predict import Predictor, collect_inputs, inside, parse_thresholds, safe_name


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("predict")
    torch.manual_seed(0)
    cfg = load_config("dlrv", ["model.backbone=densenet-tiny", "model.pretrained=false", "data.image_size=96"])
    save_checkpoint(tmp / "tiny.pt", build_model(cfg.model, use_region=cfg.loss.use_rv), cfg, epoch=0, metric=None)
    return tmp / "tiny.pt"


def _inside_image(box: dict, width: int, height: int) -> bool:
    return (box["x"] >= 0 and box["y"] >= 0 and box["w"] >= 1 and box["h"] >= 1
            and box["x"] + box["w"] <= width and box["y"] + box["h"] <= height)


def test_predict_on_the_real_sample(sample_dir, checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    # threshold 0: every finding is "detected", so every image gets 14 boxes to check
    assert main(["predict", "--checkpoint", str(checkpoint), str(sample_dir), "--out", str(out), "--threshold", "0",
                 "--batch-size", "4", "--device", "cpu"]) == 0
    files, _ = collect_inputs([sample_dir])
    assert len(files) == 15  # 10 originals + 5 non-original copies (1024 and 512 px)
    doc = json.loads((out / "predictions.json").read_text())
    assert doc["schema"] == "cxrloc.predict/1" and doc["errors"] == []
    assert doc["model"]["checkpoint"] == str(checkpoint) and len(doc["model"]["sha256"]) == 64
    assert doc["model"]["findings"] == list(FINDINGS)
    assert [im["file"] for im in doc["images"]] == [str(f) for f in files]
    overlays = sorted((out / "overlays").glob("*.png"))
    assert len(overlays) == 15 and len({im["overlay"] for im in doc["images"]}) == 15
    for im in doc["images"]:
        with Image.open(im["file"]) as src:
            assert (im["width"], im["height"]) == src.size
        assert list(im["probabilities"]) == list(FINDINGS)
        assert all(0.0 <= p <= 1.0 for p in im["probabilities"].values())
        assert [d["finding"] for d in im["detections"]] == list(FINDINGS)
        for det in im["detections"]:
            assert det["probability"] == im["probabilities"][det["finding"]]
            assert len(det["boxes"]) == 1 and _inside_image(det["boxes"][0], im["width"], im["height"])
        with Image.open(out / im["overlay"]) as ov:
            assert ov.mode == "RGB" and max(ov.size) == 512
    assert "15 image(s) predicted, 210 detection(s), 0 error(s)" in capsys.readouterr().out


def test_tables_beside_the_json(sample_dir, checkpoint, tmp_path):
    """predictions.csv holds the JSON's probabilities; maps.npz (--save-maps) the maps its boxes came from."""
    import pandas as pd

    out = tmp_path / "out"
    assert main(["predict", "--checkpoint", str(checkpoint), str(sample_dir), "--out", str(out), "--threshold", "0",
                 "--no-overlays", "--save-maps", "--device", "cpu"]) == 0
    doc = json.loads((out / "predictions.json").read_text())
    assert doc["files"] == {"csv": "predictions.csv", "maps": "maps.npz"}
    table = pd.read_csv(out / "predictions.csv")
    assert table["file"].tolist() == [im["file"] for im in doc["images"]]
    assert table[["width", "height"]].to_numpy().tolist() == [[im["width"], im["height"]] for im in doc["images"]]
    np.testing.assert_array_equal(table[list(FINDINGS)].to_numpy(),
                                  [[im["probabilities"][f] for f in FINDINGS] for im in doc["images"]])
    with np.load(out / "maps.npz") as z:
        ids, maps, findings = z["image_ids"], z["maps"], z["findings"]
    assert ids.tolist() == table["file"].tolist() and findings.tolist() == list(FINDINGS)
    assert maps.shape[:2] == (15, 14) and 0.0 <= maps.min() and maps.max() <= 1.0
    threshold = doc["settings"]["map_threshold"]
    for im, grid in zip(doc["images"], maps, strict=True):  # every detection box comes from the stored map
        for det in im["detections"]:
            box = boxes_from_map(grid[FINDINGS.index(det["finding"])], (im["width"], im["height"]), [threshold],
                                 doc["settings"]["box_mode"])[0][0]
            assert [det["boxes"][0][k] for k in "xywh"] == box.tolist()
    # without --save-maps: the CSV only
    assert main(["predict", "--checkpoint", str(checkpoint), str(sample_dir / "images"), "--out", str(tmp_path / "o2"),
                 "--no-overlays", "--device", "cpu"]) == 0
    assert (tmp_path / "o2" / "predictions.csv").exists() and not (tmp_path / "o2" / "maps.npz").exists()


def test_boxes_and_probabilities_match_the_model(sample_dir, checkpoint):
    from cxrloc.data.io import read_image_resized
    from cxrloc.data.transforms import batch_transform
    from cxrloc.model import load_model

    model, cfg, _ = load_model(checkpoint)
    predictor = Predictor(model, cfg, decision_thresholds=parse_thresholds(["0"]), map_threshold=0.4)
    path = sample_dir / "images" / "00000150_002.png"
    image, size = read_image_resized(path, 256)
    probs, maps = predictor.run_batch(image[None])
    ref = model.predict(batch_transform(torch.from_numpy(image[None].copy()), cfg.data))
    np.testing.assert_allclose(probs[0], ref["probs"][0].numpy(), atol=1e-5)
    dets = predictor.detections(probs[0], maps[0], size)
    mass = dets[FINDINGS.index("Mass")]["boxes"][0]
    expected = boxes_from_map(maps[0][FINDINGS.index("Mass")], size, [0.4])[0][0]
    assert [mass["x"], mass["y"], mass["w"], mass["h"]] == expected.tolist()


def test_hflip_tta_flag_and_checkpoint_default(sample_dir, checkpoint, tmp_path):
    """``--hflip-tta`` (default: the checkpoint's eval.hflip_tta) averages with the mirrored image, and says so."""
    from cxrloc.data.io import read_image_resized
    from cxrloc.data.transforms import batch_transform
    from cxrloc.model import load_model

    path = sample_dir / "images" / "00000150_002.png"
    runs = {}
    for name, flag in (("plain", []), ("tta", ["--hflip-tta"])):
        assert main(["predict", "--checkpoint", str(checkpoint), str(path), "--out", str(tmp_path / name),
                     "--no-overlays", "--device", "cpu", "--no-channels-last", *flag]) == 0
        runs[name] = json.loads((tmp_path / name / "predictions.json").read_text())
    assert runs["plain"]["settings"]["hflip_tta"] is False and runs["tta"]["settings"]["hflip_tta"] is True
    model, cfg, _ = load_model(checkpoint)
    image, _ = read_image_resized(path, 256)
    ref = model.predict(batch_transform(torch.from_numpy(image[None].copy()), cfg.data), hflip_tta=True)
    got = [runs["tta"]["images"][0]["probabilities"][f] for f in FINDINGS]
    np.testing.assert_allclose(got, ref["probs"][0].numpy(), atol=1e-5)
    assert got != [runs["plain"]["images"][0]["probabilities"][f] for f in FINDINGS]


def test_bad_files_are_reported_and_skipped(sample_dir, checkpoint, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(sample_dir / "images" / "00000001_000.png", src / "good.png")
    (src / "truncated.png").write_bytes((sample_dir / "images" / "00000003_000.png").read_bytes()[:3000])
    (src / "notes.png").write_text("not an image")
    out = tmp_path / "out"
    rc = main(["predict", "--checkpoint", str(checkpoint), str(src), str(tmp_path / "missing.png"), "--out", str(out),
               "--no-overlays", "--device", "cpu"])
    assert rc == 0
    doc = json.loads((out / "predictions.json").read_text())
    assert [Path(im["file"]).name for im in doc["images"]] == ["good.png"]
    errors = {Path(e["file"]).name: e["error"] for e in doc["errors"]}
    assert set(errors) == {"missing.png", "notes.png", "truncated.png"}
    assert "truncated.png" in errors["truncated.png"] and errors["missing.png"] == "no such file or folder"
    assert doc["images"][0]["overlay"] is None and not (out / "overlays").exists()


def test_dicom_input(checkpoint, tmp_path):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    pixels = (np.arange(300 * 200).reshape(300, 200) % 4096).astype("<u2")
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.tobytes()
    ds.save_as(tmp_path / "scan.dcm", enforce_file_format=True)
    assert pydicom.dcmread(tmp_path / "scan.dcm").Rows == 300
    out = tmp_path / "out"
    assert main(["predict", "--checkpoint", str(checkpoint), str(tmp_path / "scan.dcm"), "--out", str(out),
                 "--threshold", "0", "--device", "cpu"]) == 0
    doc = json.loads((out / "predictions.json").read_text())
    (im,) = doc["images"]
    assert (im["width"], im["height"]) == (200, 300)
    assert all(_inside_image(d["boxes"][0], 200, 300) for d in im["detections"])
    with Image.open(out / im["overlay"]) as ov:
        assert ov.size == (341, 512)  # original aspect ratio


def test_output_names_are_sanitised_and_unique(sample_dir, checkpoint, tmp_path):
    png = (sample_dir / "images" / "00000001_000.png").read_bytes()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(png)
    (tmp_path / "b" / "x.png").write_bytes(png)
    weird = tmp_path / "b" / "..%2F..%2Fevil näme .png"
    weird.write_bytes(png)
    out = tmp_path / "out"
    assert main(["predict", "--checkpoint", str(checkpoint), str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out),
                 "--device", "cpu"]) == 0
    doc = json.loads((out / "predictions.json").read_text())
    names = [im["overlay"] for im in doc["images"]]
    assert len(set(names)) == 3
    for name in names:
        assert name.startswith("overlays/") and "/" not in name[len("overlays/"):]
        assert (out / name).resolve().is_relative_to(out.resolve())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "out"]  # nothing written beside --out
    taken: set[str] = set()
    assert safe_name(Path("../../etc/.passwd"), taken) == "passwd"
    assert safe_name(Path("x y.png"), taken) == "x_y" and safe_name(Path("X Y.png"), taken) == "X_Y-2"
    with pytest.raises(ValueError, match="outside the output folder"):
        inside(out, out / ".." / "escape.png")


def test_parse_thresholds():
    t = parse_thresholds(["0.4", "Infiltrate=0.2", "Mass=0.9"])
    assert t["Infiltration"] == 0.2 and t["Mass"] == 0.9 and t["Hernia"] == 0.4
    assert parse_thresholds([])["Edema"] == 0.5
    assert parse_thresholds(["Mass=0.1", "0.7"])["Mass"] == 0.1  # per-finding wins whatever the order
    with pytest.raises(ValueError, match="unknown finding"):
        parse_thresholds(["Flu=0.3"])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        parse_thresholds(["1.5"])
    with pytest.raises(ValueError, match="expected a number"):
        parse_thresholds(["high"])
