"""Bad-input catalogue for ``prepare``, ``predict`` and ``evaluate``.

Every bad file gets a message naming it and the reason, the others in the batch finish,
and nothing is written outside the output folder. The catalogue (:func:`catalogue`):

refused  zero-byte file, text file named .png, truncated PNG, 1x1 image, PNG headers
         claiming 30000x30000 and 9000x9000 pixels (refused before decoding), DICOM
         without pixel data, DICOM with an unsupported (undecodable) transfer syntax
warned   16-bit image using only 0..255, CMYK JPEG, nearly constant image
fine     16-bit image with a full range, a valid DICOM, file names with spaces,
         unicode, a leading ``..`` and a path through ``../``
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fault_tools import dicom_bytes, png_bytes, png_header_only, tree_state
from PIL import Image

from cxrloc.cli import main
from cxrloc.data.cache import write_cache
from cxrloc.data.report import DatasetValidationError
from cxrloc.labels import FINDINGS

#: file name -> reason (regex) it is refused for
REFUSED = {
    "zero_byte.png": "not a readable image",
    "text_file.png": "not a readable image",
    "truncated.png": "corrupt or truncated image data",
    "one_pixel.png": r"refused, 1x1 pixels is too small to be a radiograph",
    "huge_30000.png": r"refused, header claims more pixels than the limit",
    "huge_9000.png": r"refused, header claims 9000x9000 = 81,000,000 pixels, more than the limit",
    "no_pixels.dcm": "DICOM file has no pixel data",
    "jpeg2000.dcm": r"cannot decode DICOM pixel data, transfer syntax JPEG 2000",
}
#: file name -> warning (regex) logged while it is used
WARNED = {
    "sixteen_bit_0_255.png": r"intensity range looks wrong: integer image \(mode I;16\) whose values span only \d+\.\.\d+ ",
    "cmyk.jpg": "CMYK colour image",
    "nearly_constant.png": r"intensity range looks wrong: nearly constant image",
}
#: decoded without a message
FINE = ("sixteen_bit.png", "valid.dcm", "name with spaces.png", "ünïcødé_名前.png", "..dots.png")


def catalogue(folder: Path, good: np.ndarray) -> dict[str, Path]:
    """Write every catalogue file into ``folder``; ``good`` is a (64, 64) uint8 radiograph to derive them from."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    ramp16 = (good.astype(np.uint16) * 16 + rng.integers(0, 16, good.shape)).astype(np.uint16)
    files = {
        "zero_byte.png": b"",
        "text_file.png": b"this is not an image, just text\n",
        "truncated.png": png_bytes(good)[:300],
        "one_pixel.png": png_bytes(np.full((1, 1), 128, np.uint8)),
        "huge_30000.png": png_header_only(30000, 30000),
        "huge_9000.png": png_header_only(9000, 9000),
        "no_pixels.dcm": dicom_bytes(None),
        "jpeg2000.dcm": dicom_bytes(ramp16, transfer_syntax="1.2.840.10008.1.2.4.90"),
        "sixteen_bit_0_255.png": png_bytes(good.astype(np.uint16)),
        "nearly_constant.png": png_bytes((120 + rng.integers(0, 3, good.shape)).astype(np.uint8)),
        "sixteen_bit.png": png_bytes(ramp16),
        "valid.dcm": dicom_bytes(ramp16),
        "name with spaces.png": png_bytes(good),
        "ünïcødé_名前.png": png_bytes(np.ascontiguousarray(good[::-1])),
        "..dots.png": png_bytes(np.ascontiguousarray(good[:, ::-1])),
    }
    paths = {}
    for name, data in files.items():
        (folder / name).write_bytes(data)
        paths[name] = folder / name
    Image.fromarray(good).convert("CMYK").save(folder / "cmyk.jpg", quality=95)
    paths["cmyk.jpg"] = folder / "cmyk.jpg"
    assert set(paths) == set(REFUSED) | set(WARNED) | set(FINE)
    return paths


@pytest.fixture(scope="module")
def good_image(synth_data) -> np.ndarray:
    return np.asarray(Image.open(sorted((synth_data / "images").glob("*.png"))[0]))


def _warnings_by_file(caplog, names) -> dict[str, list[str]]:
    text = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    return {n: [t for t in text if n in t] for n in names}


# --------------------------------------------------------------------------- prepare


@pytest.fixture
def bad_dataset(synth_data, good_image, tmp_path) -> Path:
    """The synthetic dataset plus the catalogue in images/, each listed in Data_Entry and train_val_list,
    plus a row ``../escape.png`` naming a real file outside the dataset folder."""
    root = tmp_path / "data"
    shutil.copytree(synth_data, root)
    catalogue(root / "images", good_image)
    (tmp_path / "escape.png").write_bytes(png_bytes(good_image))
    names = [*REFUSED, *WARNED, *FINE, "../escape.png"]
    with open(root / "Data_Entry_2017.csv", "a", encoding="utf-8") as f:
        for k, name in enumerate(names):
            f.write(f"{name},No Finding,0,{9000 + k},50,M,PA,64,64,0.1,0.1\n")
    with open(root / "train_val_list.txt", "a", encoding="utf-8") as f:
        f.write("\n" + "\n".join(names))
    return root


def test_prepare_strict_names_the_bad_rows(bad_dataset, tmp_path):
    with pytest.raises(DatasetValidationError) as err:
        main_prepare(bad_dataset, tmp_path / "cache", lenient=False)
    text = str(err.value)
    assert "'name with spaces.png' is not a single image name" in text
    assert "../escape.png (Data_Entry line" in text and "no image file found" in text
    assert not (tmp_path / "cache" / "meta.json").exists()


def main_prepare(data: Path, out: Path, lenient: bool):
    from cxrloc.data.prepare import prepare_cache

    return prepare_cache(data, out, size=64, workers=2, chunk_size=8, lenient=lenient, progress=False)


def test_prepare_lenient_skips_each_bad_file_with_its_reason(bad_dataset, tmp_path, caplog, capsys):
    caplog.set_level(logging.WARNING)
    out = tmp_path / "cache"
    outside_before = tree_state(tmp_path, skip=(out,))
    assert main(["prepare", "--data-dir", str(bad_dataset), "--out", str(out), "--size", "64", "--workers", "1",
                 "--chunk-size", "8", "--lenient", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    bad = report["problems"]["bad_image"]
    assert bad["count"] == len(REFUSED)
    for name, reason in REFUSED.items():
        hits = [m for m in bad["examples"] if m.startswith(str(bad_dataset / "images" / name) + ":")]
        assert len(hits) == 1 and re.search(reason, hits[0]), (name, hits)
        assert name in printed  # also on the terminal
    assert any("'name with spaces.png' is not a single image name" in m
               for m in report["problems"]["malformed_row"]["examples"])
    absent = report["problems"]["listed_absent"]["examples"]
    assert any(m.startswith("../escape.png") for m in absent)  # never looked for outside the folder
    assert any(m.startswith("..dots.png") for m in absent)  # hidden files (leading dot) are not scanned
    index = pd.read_csv(out / "index.csv")
    cached = set(index["image_id"])
    skipped = {"name with spaces.png", "../escape.png", "..dots.png"}
    assert cached >= set(WARNED) | (set(FINE) - skipped)  # the others all finished
    assert not cached & (set(REFUSED) | skipped)
    assert len(index) == 40 + len(WARNED) + len(FINE) - 2
    for name, messages in _warnings_by_file(caplog, WARNED).items():
        assert any(re.search(WARNED[name], m) for m in messages), (name, messages)
    assert tree_state(tmp_path, skip=(out,)) == outside_before  # nothing written outside --out


# --------------------------------------------------------------------------- predict


@pytest.mark.parametrize("workers", [0, 2])
def test_predict_reports_each_bad_file_and_finishes_the_others(reference_run, good_image, tmp_path, caplog, capsys,
                                                               workers):
    caplog.set_level(logging.WARNING)
    files = catalogue(tmp_path / "in", good_image)
    (tmp_path / "in" / "sub").mkdir()
    through_dotdot = tmp_path / "in" / "sub" / ".." / "name with spaces.png"
    inputs = [*files.values(), through_dotdot, tmp_path / "in" / "missing.png"]
    out = tmp_path / "out"
    before = tree_state(tmp_path, skip=(out,))
    rc = main(["predict", "--checkpoint", str(reference_run.run / "checkpoints/best.pt"), *map(str, inputs),
               "--out", str(out), "--device", "cpu", "--decode-size", "64", "--batch-size", "4",
               "--workers", str(workers)])
    printed = capsys.readouterr().out
    assert rc == 0
    doc = json.loads((out / "predictions.json").read_text())
    errors = {Path(e["file"]).name: e["error"] for e in doc["errors"]}
    assert set(errors) == set(REFUSED) | {"missing.png"}
    for name, reason in REFUSED.items():
        assert name in errors[name] and re.search(reason, errors[name]), (name, errors[name])
        assert f"skipped {files[name]}" in printed
    assert "no such file" in errors["missing.png"]
    predicted = [Path(im["file"]).name for im in doc["images"]]
    assert sorted(predicted) == sorted([*WARNED, *FINE, "name with spaces.png"])
    for im in doc["images"]:
        assert len(im["probabilities"]) == len(FINDINGS)
        assert all(np.isfinite(v) for v in im["probabilities"].values())
        overlay = (out / im["overlay"]).resolve()
        assert overlay.is_file() and overlay.parent == (out / "overlays").resolve()
        assert re.fullmatch(r"[A-Za-z0-9._-]+\.png", overlay.name) and not overlay.name.startswith(".")
    assert len({im["overlay"] for im in doc["images"]}) == len(doc["images"])  # no overwrites
    for name, messages in _warnings_by_file(caplog, WARNED).items():
        assert any(re.search(WARNED[name], m) for m in messages), (name, messages)
    assert tree_state(tmp_path, skip=(out,)) == before  # nothing written outside --out


def test_predict_with_only_bad_files_fails_clearly(reference_run, good_image, tmp_path, capsys):
    files = catalogue(tmp_path / "in", good_image)
    rc = main(["predict", "--checkpoint", str(reference_run.run / "checkpoints/best.pt"),
               *(str(files[n]) for n in REFUSED), "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert rc == 1
    doc = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert doc["images"] == [] and len(doc["errors"]) == len(REFUSED)


# --------------------------------------------------------------------------- evaluate


def test_evaluate_with_odd_image_ids_writes_only_inside_out(reference_run, good_image, tmp_path, capsys):
    """A cache whose image ids hold spaces, unicode, ``../`` and HTML, one nearly constant image: all scored."""
    ids = ["a b.png", "ünï 名.png", "../../escape.png", "<script>alert(1)</script>.png", "flat.png",
           *[f"{i:08d}_000.png" for i in range(11)]]
    n = len(ids)
    rng = np.random.default_rng(3)
    images = np.stack([np.roll(good_image, 3 * i, axis=1) for i in range(n)])
    images[4] = 120
    index = pd.DataFrame({"image_id": ids, "patient_id": np.arange(n), "split": "test", "orig_width": 64,
                          "orig_height": 64})
    labels = rng.random((n, len(FINDINGS))) < 0.3
    labels[:2, :] = [True] * 8 + [False] * 6, [False] * 14
    for j, name in enumerate(FINDINGS):
        index[name] = labels[:, j].astype(np.uint8)
    boxes = pd.DataFrame({"image_id": ids[:4], "finding": [FINDINGS[0]] * 4, "x": 5.0, "y": 5.0, "w": 30.0, "h": 30.0})
    for k in range(4):
        index.loc[k, FINDINGS[0]] = 1
    cache = tmp_path / "cache"
    write_cache(cache, images, index, boxes)
    out = tmp_path / "out"
    before = tree_state(tmp_path, skip=(out,))
    assert main(["evaluate", "--checkpoint", str(reference_run.run / "checkpoints/best.pt"), "--data", str(cache),
                 "--out", str(out), "--device", "cpu", "--bootstrap", "5", "--cv-folds", "2"]) == 0
    capsys.readouterr()
    assert tree_state(tmp_path, skip=(out,)) == before
    assert {p.name for p in out.iterdir()} >= {"metrics.json", "report.md", "report.html", "predictions.npz"}
    assert all(p.parent == out for p in out.rglob("*"))
    assert json.loads((out / "metrics.json").read_text())["num_images"] == n
    assert "<script>alert" not in (out / "report.html").read_text()


@pytest.mark.parametrize("state, message", [("missing", "cache folder does not exist"),
                                            ("unfinished", "missing; the cache is unfinished")])
def test_evaluate_refuses_a_missing_or_unfinished_cache(reference_run, tmp_path, capsys, state, message):
    cache = tmp_path / "cache"
    if state == "unfinished":
        shutil.copytree(reference_run.cache, cache)
        (cache / "meta.json").unlink()
    rc = main(["evaluate", "--checkpoint", str(reference_run.run / "checkpoints/best.pt"), "--data", str(cache),
               "--out", str(tmp_path / "out"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and str(cache) in err and "Traceback" not in err
