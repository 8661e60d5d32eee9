import numpy as np
import pandas as pd
import pytest
from cxr14_builders import DEFAULT_ROWS, make_dataset

from cxrloc.data.chestxray14 import (
    DatasetError,
    assign_splits,
    check_patient_disjoint,
    read_dataset,
    read_name_list,
    scan_dataset,
)
from cxrloc.data.io import read_image
from cxrloc.data.report import DatasetValidationError, ValidationReport
from cxrloc.labels import FINDINGS, encode


def _messages(report, kind):
    return report.messages.get(kind, [])


def test_clean_folder_reads_without_problems(tmp_path):
    make_dataset(tmp_path / "d")
    ds = read_dataset(tmp_path / "d")
    assert ds.report.ok, ds.report.summary()
    e = ds.entries
    assert e["image_id"].tolist() == [r[0] for r in DEFAULT_ROWS]
    for (name, labels, patient, official), row, vec in zip(DEFAULT_ROWS, e.itertuples(), ds.labels, strict=True):
        assert row.patient_id == patient and row.official_split == official
        np.testing.assert_array_equal(vec, encode(labels))
        assert row.path.endswith(f"images_001/images/{name}")
    no_finding = e["image_id"] == "00000002_000.png"
    assert ds.labels[no_finding.to_numpy()].sum() == 0
    assert set(e.loc[e.official_split == "test", "split"]) == {"test"}
    assert set(e.loc[e.official_split == "train_val", "split"]) == {"train", "val"}
    check_patient_disjoint(e["patient_id"].to_numpy(), e["split"].to_numpy())
    # BBox_List: canonical names (Infiltrate -> Infiltration), original coordinates kept
    assert ds.boxes["finding"].tolist() == ["Atelectasis", "Infiltration", "Pneumonia"]
    assert ds.boxes.iloc[0][["x", "y", "w", "h"]].tolist() == [10.5, 12.0, 20.25, 8.0]
    assert len(ds.usable()) == len(DEFAULT_ROWS)
    ds.report.raise_if_problems()  # strict passes


@pytest.mark.parametrize("name", ["Data_Entry_2017.csv", "Data_Entry_2017_v2020.csv"])
def test_gz_and_v2020_names_and_flat_images(tmp_path, name):
    make_dataset(tmp_path / "d", gz=True, data_entry_name=name, nested=False)
    ds = read_dataset(tmp_path / "d")
    assert ds.report.ok and len(ds.usable()) == len(DEFAULT_ROWS)
    assert str(ds.files.metadata[name]).endswith(f"{name}.gz")


def test_every_problem_kind_is_reported_naming_file_and_row(tmp_path):
    root = tmp_path / "d"
    folder = make_dataset(
        root,
        extra_entry_lines=[
            "00000011_000.png,Effusion|Headache,0,11,50,M,PA,1,1,1,1",  # unknown label, line 14
            "00000001_000.png,Mass,0,1,50,M,PA,1,1,1,1",  # duplicate name, line 15
            "00000012_000.png,Mass",  # malformed: too few fields, line 16
            "00000013_000.png,Mass,0,abc,50,M,PA,1,1,1,1",  # malformed: patient id, line 17
            "00000014_000.png,Mass,0,14,50,M,PA,1,1,1,1",  # in no split list
        ],
        skip_images=("00000003_000.png",),  # listed but absent
    )
    (folder / "99999999_000.png").write_bytes((folder / "00000001_000.png").read_bytes())  # present, unlisted
    other = root / "images_002" / "images"
    other.mkdir(parents=True)
    (other / "00000002_000.png").write_bytes((folder / "00000002_000.png").read_bytes())  # same name twice
    with open(root / "test_list.txt", "a") as f:
        f.write("\n00000001_001.png\n77777777_000.png")  # split conflict, unknown name
    with open(root / "BBox_List_2017.csv", "a") as f:
        f.write("00000009_000.png,Tumour,1,2,3,4\n00000009_000.png,Mass,1,2,x,4\n55555555_000.png,Mass,1,2,3,4\n")
    ds = read_dataset(root)
    r = ds.report
    assert any("Data_Entry_2017.csv:14" in m and "Headache" in m for m in _messages(r, "unknown_label"))
    assert any("Data_Entry_2017.csv:15" in m and "line 2" in m for m in _messages(r, "duplicate_name"))
    assert any("Data_Entry_2017.csv:16" in m and "2 field(s)" in m for m in _messages(r, "malformed_row"))
    assert any("Data_Entry_2017.csv:17" in m and "'abc'" in m for m in _messages(r, "malformed_row"))
    assert any("00000014_000.png" in m for m in _messages(r, "split_missing"))
    assert _messages(r, "listed_absent") == ["00000003_000.png (Data_Entry line 5): no image file found", "00000014_000.png (Data_Entry line 18): no image file found"]
    assert any("99999999_000.png" in m for m in _messages(r, "unlisted_image"))
    assert any("00000002_000.png: 2 files" in m for m in _messages(r, "duplicate_name"))
    assert any("00000001_001.png" in m for m in _messages(r, "split_conflict"))
    assert any("77777777_000.png" in m for m in _messages(r, "split_unknown"))
    assert any("BBox_List_2017.csv:5" in m and "Tumour" in m for m in _messages(r, "unknown_label"))
    assert any("BBox_List_2017.csv:6" in m and "not numbers" in m for m in _messages(r, "malformed_row"))
    assert any("BBox_List_2017.csv:7" in m for m in _messages(r, "box_unknown_image"))
    # lenient: the usable remainder (absent, conflicting and bad rows out; first duplicate row kept)
    usable = ds.usable()
    assert set(usable["image_id"]) == {r[0] for r in DEFAULT_ROWS} - {"00000003_000.png", "00000001_001.png"}
    assert usable.set_index("image_id").loc["00000001_000.png", "Cardiomegaly"] == 1  # first row wins
    assert usable.set_index("image_id").loc["00000002_000.png", "path"].endswith("images_001/images/00000002_000.png")
    with pytest.raises(DatasetValidationError, match=r"unknown_label .*: 2\n.*Headache"):
        r.raise_if_problems()


def test_patient_in_both_lists_is_reported_and_kept_out_of_training(tmp_path):
    rows = [*DEFAULT_ROWS, ("00000008_002.png", "Mass", 8, "train_val")]  # patient 8 is a test patient
    make_dataset(tmp_path / "d", rows=rows)
    ds = read_dataset(tmp_path / "d")
    assert ds.report.count("patient_overlap") == 1 and "patient 8" in _messages(ds.report, "patient_overlap")[0]
    e = ds.entries.set_index("image_id")
    assert e.loc["00000008_002.png", "split"] == "" and e.loc["00000008_000.png", "split"] == "test"
    check_patient_disjoint(ds.entries["patient_id"].to_numpy(), ds.entries["split"].to_numpy())


def test_missing_files(tmp_path):
    make_dataset(tmp_path / "d", write_bbox=False)
    ds = read_dataset(tmp_path / "d")
    assert ds.report.count("missing_file") == 1 and "BBox_List_2017.csv" in _messages(ds.report, "missing_file")[0]
    assert ds.boxes.empty and list(ds.boxes.columns) == ["image_id", "finding", "x", "y", "w", "h"]
    (tmp_path / "d" / "test_list.txt").unlink()
    ds = read_dataset(tmp_path / "d")
    assert set(ds.usable()["split"]) <= {"train", "val"} and ds.report.count("split_missing") == 4
    (tmp_path / "d" / "train_val_list.txt").unlink()
    with pytest.raises(DatasetError, match="neither train_val_list.txt nor test_list.txt"):
        read_dataset(tmp_path / "d")
    (tmp_path / "d" / "Data_Entry_2017.csv").unlink()
    with pytest.raises(DatasetError, match="no Data_Entry_2017_v2020.csv or Data_Entry_2017.csv"):
        read_dataset(tmp_path / "d")
    with pytest.raises(DatasetError, match="does not exist"):
        read_dataset(tmp_path / "nope")


def test_bad_data_entry_header(tmp_path):
    make_dataset(tmp_path / "d")
    (tmp_path / "d" / "Data_Entry_2017.csv").write_text("Image,Labels\na.png,Mass\n")
    with pytest.raises(DatasetError, match=r"Data_Entry_2017.csv: header lacks column\(s\)"):
        read_dataset(tmp_path / "d")


def test_assign_splits_is_seeded_and_patient_level():
    rng = np.random.default_rng(1)
    patients = rng.integers(0, 500, 3000)
    official = np.where(patients < 400, "train_val", "test").astype(object)
    a = assign_splits(patients, official, 0.1, seed=0)
    np.testing.assert_array_equal(a, assign_splits(patients, official, 0.1, seed=0))
    assert not np.array_equal(a, assign_splits(patients, official, 0.1, seed=1))
    val_patients = np.unique(patients[a == "val"])
    assert len(val_patients) == round(0.1 * len(np.unique(patients[official == "train_val"])))
    assert set(a[official == "test"]) == {"test"}
    check_patient_disjoint(patients, a)
    assert set(assign_splits(patients, official, 0.0)) == {"train", "test"}
    bad = a.copy()
    bad[np.flatnonzero(patients == val_patients[0])[0]] = "train"
    with pytest.raises(ValueError, match=f"1 patient.*{val_patients[0]}"):
        check_patient_disjoint(patients, bad)


def test_report_caps_stored_messages_but_counts_all():
    r = ValidationReport(keep=3)
    for i in range(1000):
        r.add("listed_absent", f"img{i}")
    d = r.to_dict(per_kind=2)
    assert d["problems"]["listed_absent"] == {"count": 1000, "meaning": d["problems"]["listed_absent"]["meaning"], "examples": ["img0", "img1"]}
    assert "- img2\n    ... and 997 more" in r.summary(per_kind=10)
    with pytest.raises(ValueError, match="unknown problem kind"):
        r.add("nope", "x")


def test_name_list_duplicates_and_malformed(tmp_path):
    p = tmp_path / "train_val_list.txt"
    p.write_text("a.png\nb.png\n\na.png\nc.png, d.png\n")
    r = ValidationReport()
    assert read_name_list(p, r) == ["a.png", "b.png"]
    assert r.count("duplicate_name") == 1 and r.count("malformed_row") == 1
    assert "train_val_list.txt:4" in r.messages["duplicate_name"][0]


# --------------------------------------------------------------------------- the real files


@pytest.fixture(scope="module")
def real(sample_dir):
    return read_dataset(sample_dir)


def test_real_lists_and_data_entry(real, sample_dir):
    r = ValidationReport()
    train_val = read_name_list(sample_dir / "train_val_list.txt", r)
    test = read_name_list(sample_dir / "test_list.txt", r)
    assert (len(train_val), len(test)) == (86_524, 25_596) and r.ok
    assert set(train_val) | set(test) == set(real.entries["image_id"]) and len(real.entries) == 112_120
    assert not set(train_val) & set(test)
    assert real.entries["patient_id"].nunique() == 30_805
    for kind in ("malformed_row", "unknown_label", "split_missing", "split_unknown", "split_conflict", "patient_overlap"):
        assert real.report.count(kind) == 0, kind


def test_real_split_is_patient_disjoint_with_paper_sizes(real):
    e = real.entries
    check_patient_disjoint(e["patient_id"].to_numpy(), e["split"].to_numpy())
    counts = e["split"].value_counts()
    assert counts["test"] == 25_596 and counts["train"] + counts["val"] == 86_524
    assert 7_800 <= counts["val"] <= 9_600  # paper: 8,703 (10% of 28,008 patients, seeded)
    assert e.loc[e.split == "val", "patient_id"].nunique() == round(0.1 * 28_008)
    tv = e[e.official_split == "train_val"]
    assert tv["patient_id"].nunique() == 28_008


def test_real_boxes(real):
    b = real.boxes
    assert len(b) == 984 and b["image_id"].nunique() == 880
    assert set(b["finding"]) == set(FINDINGS[:8])
    assert (b["finding"] == "Infiltration").sum() == 123
    test_ids = set(real.entries.loc[real.entries.split == "test", "image_id"])
    assert set(b["image_id"]) <= test_ids
    row = b[(b.image_id == "00000032_037.png")].iloc[0]
    assert row["finding"] == "Infiltration" and abs(row["x"] - 339.17) < 0.01 and abs(row["h"] - 351.09) < 0.01


def test_real_sample_images_decode_and_match(real, sample_dir):
    files = sorted((sample_dir / "images").glob("*.png"))
    assert len(files) == 10
    for p in files:
        img = read_image(p)
        assert img.shape == (1024, 1024) and img.dtype == np.uint8 and img.std() > 10, p
    usable = real.usable().set_index("image_id")
    index = pd.read_csv(sample_dir / "sample_index.csv")
    for row in index[index["is_original"] == 1].itertuples():
        assert usable.loc[row._1, "path"] == str(sample_dir / row.file)  # the original wins over re-encoded copies
        np.testing.assert_array_equal(usable.loc[row._1, list(FINDINGS)].to_numpy(dtype=np.uint8), encode(row._2))
    assert real.report.count("duplicate_name") == 1  # 00000001_000.png also under non_original/


def test_scan_skips_hidden_and_non_images(tmp_path):
    make_dataset(tmp_path / "d")
    (tmp_path / "d" / ".hidden").mkdir()
    (tmp_path / "d" / ".hidden" / "00000001_000.png").write_bytes(b"x")
    (tmp_path / "d" / "notes.txt").write_text("x")
    files = scan_dataset(tmp_path / "d")
    assert len(files.images) == len(DEFAULT_ROWS) and all(len(v) == 1 for v in files.images.values())
