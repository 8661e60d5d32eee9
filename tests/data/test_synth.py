"""The synthetic phantom generator (`cxrloc synth`): layout, determinism, true boxes, label statistics."""

from __future__ import annotations

import dataclasses
import gzip
import io
import re

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxrloc.cli import main
from cxrloc.data.synth import (
    DIFFICULTIES,
    Phantom,
    cohort,
    generate_dataset,
    phantom_for,
    plan_cohort,
    render,
    sample_acquisition,
    sample_anatomy,
    sample_finding,
    writer,
)
from cxrloc.data.synth.render import blur_passes
from cxrloc.labels import BOX_FINDINGS, FINDINGS, encode

SIZE = 96
N_IMAGES = 120
SEED = 3
NAME = re.compile(r"^\d{8}_\d{3}\.png$")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth") / "d"
    result = generate_dataset(root, N_IMAGES, size=SIZE, seed=SEED, difficulty="medium", bbox_fraction=1.0, progress=False)
    return root, result


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _changed_box(a: np.ndarray, b: np.ndarray):
    ys, xs = np.nonzero(a != b)
    if ys.size == 0:
        return None
    return xs.min(), ys.min(), xs.max(), ys.max()


def _inside(changed, box) -> bool:
    x, y, w, h = box
    return changed[0] >= x and changed[1] >= y and changed[2] <= x + w - 1 and changed[3] <= y + h - 1


def _iou(changed, box) -> float:
    x0, y0, x1, y1 = changed
    bx0, by0, bx1, by1 = box[0], box[1], box[0] + box[2] - 1, box[1] + box[3] - 1
    iw = max(0, min(x1, bx1) - max(x0, bx0) + 1)
    ih = max(0, min(y1, by1) - max(y0, by0) + 1)
    inter = iw * ih
    return inter / ((x1 - x0 + 1) * (y1 - y0 + 1) + box[2] * box[3] - inter)


# --------------------------------------------------------------------------- layout and formats
def test_layout_matches_the_official_files(dataset, sample_dir):
    root, result = dataset
    with gzip.open(sample_dir / "Data_Entry_2017_v2020.csv.gz", "rt") as f:
        real_header = f.readline().rstrip("\n")
    ours = (root / "Data_Entry_2017.csv").read_text()
    assert ours.split("\n", 1)[0] == real_header
    assert ours.endswith("\n") and "\r" not in ours
    real_bbox_header = (sample_dir / "BBox_List_2017.csv").read_text().split("\n", 1)[0]
    assert (root / "BBox_List_2017.csv").read_text().split("\n", 1)[0] == real_bbox_header == "Image Index,Finding Label,Bbox [x,y,w,h],,,"
    for name in ("train_val_list.txt", "test_list.txt"):
        real, mine = (sample_dir / name).read_bytes(), (root / name).read_bytes()
        assert not real.endswith(b"\n") and not mine.endswith(b"\n")
        assert set(map(len, mine.split(b"\n"))) == set(map(len, real.split(b"\n"))) == {16}  # 17 bytes with "\n"

    entries = pd.read_csv(root / "Data_Entry_2017.csv")
    real = pd.read_csv(sample_dir / "Data_Entry_2017_v2020.csv.gz", nrows=5)
    assert list(entries.columns) == list(real.columns) and len(entries.columns) == 11
    assert len(entries) == N_IMAGES and entries["Image Index"].is_unique
    assert entries["Image Index"].map(NAME.match).all()
    assert (entries["Image Index"].str[:8].astype(int) == entries["Patient ID"]).all()
    assert (entries["Image Index"].str[9:12].astype(int) == entries["Follow-up #"]).all()
    assert entries.groupby("Patient ID").size().max() > 1  # follow-ups exist
    assert set(entries["Patient Gender"]) <= {"M", "F"} and set(entries["View Position"]) <= {"PA", "AP"}
    assert (entries["OriginalImage[Width"] == SIZE).all() and (entries["Height]"] == SIZE).all()
    for labels in entries["Finding Labels"]:
        encode(labels)  # every label string is valid
        assert labels.split("|") == sorted(labels.split("|"))  # alphabetical, as NIH writes them

    images = sorted(p.name for p in (root / "images").iterdir())
    assert images == sorted(entries["Image Index"])
    with Image.open(root / "images" / images[0]) as im:
        assert im.mode == "L" and im.size == (SIZE, SIZE)


def test_splits_are_patient_disjoint_about_80_20(dataset):
    root, _ = dataset
    tv = (root / "train_val_list.txt").read_text().split("\n")
    te = (root / "test_list.txt").read_text().split("\n")
    entries = pd.read_csv(root / "Data_Entry_2017.csv")
    assert not set(tv) & set(te) and set(tv) | set(te) == set(entries["Image Index"])
    pid = dict(zip(entries["Image Index"], entries["Patient ID"], strict=True))
    tv_p, te_p = {pid[n] for n in tv}, {pid[n] for n in te}
    assert not tv_p & te_p
    assert abs(len(te_p) / (len(tv_p) + len(te_p)) - 0.2) < 0.02  # 20 % of patients, rounded


def test_bbox_list_is_a_test_subset_of_the_true_boxes(dataset):
    root, _ = dataset
    bbox = pd.read_csv(root / "BBox_List_2017.csv").iloc[:, :6]
    bbox.columns = ["image", "finding", "x", "y", "w", "h"]
    truth = pd.read_csv(root / "synth_truth_boxes.csv")
    test = set((root / "test_list.txt").read_text().split("\n"))
    assert len(bbox) > 0 and set(bbox["image"]) <= test
    assert set(bbox["finding"]) <= {"Infiltrate" if f == "Infiltration" else f for f in BOX_FINDINGS}
    assert "Infiltration" not in set(bbox["finding"])
    merged = bbox.assign(finding=bbox["finding"].replace({"Infiltrate": "Infiltration"})).merge(
        truth, left_on=["image", "finding"], right_on=["Image Index", "Finding Label"], suffixes=("", "_t"))
    assert len(merged) == len(bbox)
    for c in "xywh":
        np.testing.assert_array_equal(merged[c].to_numpy(), merged[f"{c}_t"].to_numpy())
    # bbox_fraction=1.0: every test image with a box finding is listed with all its box findings
    entries = pd.read_csv(root / "Data_Entry_2017.csv").set_index("Image Index")
    expected = sum(sum(f in BOX_FINDINGS for f in entries.loc[n, "Finding Labels"].split("|")) for n in test)
    assert len(bbox) == expected


def test_truth_boxes_lie_inside_the_image_and_cover_each_planted_finding(dataset):
    """Re-render every image without one of its findings: all changed pixels lie inside its box."""
    root, result = dataset
    truth = pd.read_csv(root / "synth_truth_boxes.csv")
    planted = sum(len(j.kinds) for j in result.jobs)
    assert len(truth) == planted and planted > 50
    assert (truth[["x", "y"]] >= 0).all().all() and (truth["w"] >= 1).all() and (truth["h"] >= 1).all()
    assert ((truth["x"] + truth["w"]) <= SIZE).all() and ((truth["y"] + truth["h"]) <= SIZE).all()
    checked = 0
    for job, boxes in zip(result.jobs, result.boxes, strict=True):
        if not job.kinds:
            continue
        phantom, findings = phantom_for(job, SEED, "medium")
        full = render(phantom, findings, SIZE).image
        on_disk = np.asarray(Image.open(root / "images" / job.name))
        np.testing.assert_array_equal(full, on_disk)
        for f in findings:
            without = render(phantom, [g for g in findings if g is not f], SIZE).image
            changed = _changed_box(full, without)
            assert changed is not None, f"{job.name}: {f.kind} changed nothing"
            assert _inside(changed, boxes[f.kind]), f"{job.name}: {f.kind} changed {changed} outside {boxes[f.kind]}"
            checked += 1
    assert checked == planted


@pytest.mark.parametrize("difficulty", ["easy", "medium", "hard"])
def test_each_finding_changes_pixels_only_inside_its_box(difficulty):
    """render(phantom, []) vs render(phantom, [f]): differences are non-empty, inside f's box, and the box is tight."""
    diff = DIFFICULTIES[difficulty]
    for trial in range(3):
        for i, kind in enumerate(FINDINGS):
            rng = np.random.default_rng([99, trial, i])
            anatomy = sample_anatomy(rng, "M" if trial % 2 else "F")
            phantom = Phantom(anatomy, sample_acquisition(rng, diff.noise))
            finding = sample_finding(kind, anatomy, rng, diff)
            plain = render(phantom, [], 128)
            with_f = render(phantom, [finding], 128)
            assert plain.boxes == {} and set(with_f.boxes) == {kind}
            changed = _changed_box(plain.image, with_f.image)
            assert changed is not None, f"{kind} ({difficulty}) changed nothing"
            box = with_f.boxes[kind]
            assert _inside(changed, box), f"{kind} ({difficulty}): changed {changed} outside box {box}"
            assert _iou(changed, box) > 0.6, f"{kind} ({difficulty}): box {box} not tight around changes {changed}"


def test_render_is_a_pure_function():
    rng = np.random.default_rng(5)
    anatomy = sample_anatomy(rng, "F")
    phantom = Phantom(anatomy, sample_acquisition(rng))
    findings = [sample_finding(k, anatomy, rng, DIFFICULTIES["medium"]) for k in ("Mass", "Effusion", "Cardiomegaly")]
    a, b = render(phantom, findings, 100), render(phantom, findings, 100)
    np.testing.assert_array_equal(a.image, b.image)
    assert a.boxes == b.boxes and a.image.dtype == np.uint8 and a.image.shape == (100, 100)


def test_difficulty_orders_conspicuity():
    """Mean absolute change a finding makes: easy > medium > hard (contrast and size knob)."""
    effect = {}
    for name, diff in DIFFICULTIES.items():
        total = 0.0
        for i, kind in enumerate(FINDINGS):
            rng = np.random.default_rng([7, i])
            anatomy = sample_anatomy(rng, "M")
            phantom = Phantom(anatomy, sample_acquisition(np.random.default_rng([8, i])))
            finding = sample_finding(kind, anatomy, rng, diff)
            a = render(phantom, [], 128).image.astype(int)
            b = render(phantom, [finding], 128).image.astype(int)
            total += np.abs(a - b).sum()
        effect[name] = total
    assert effect["easy"] > effect["medium"] > 1.5 * effect["hard"]
    assert DIFFICULTIES["hard"].noise > DIFFICULTIES["medium"].noise > DIFFICULTIES["easy"].noise


def test_nodule_is_several_pixels_at_128_and_smaller_than_a_mass():
    sizes = {"Nodule": [], "Mass": []}
    for i in range(20):
        rng = np.random.default_rng([11, i])
        anatomy = sample_anatomy(rng, "M")
        phantom = Phantom(anatomy, sample_acquisition(rng))
        for kind in sizes:
            f = sample_finding(kind, anatomy, rng, DIFFICULTIES["medium"])
            _, _, w, h = render(phantom, [f], 128).boxes[kind]
            sizes[kind].append(min(w, h))
    assert min(sizes["Nodule"]) >= 7
    assert np.median(sizes["Mass"]) > 1.4 * np.median(sizes["Nodule"])  # real boxes: median 0.12 W vs 0.07 W


# --------------------------------------------------------------------------- determinism
def test_same_arguments_give_byte_identical_files(tmp_path):
    a = generate_dataset(tmp_path / "a", 40, size=64, seed=11, progress=False).root
    b = generate_dataset(tmp_path / "b", 40, size=64, seed=11, progress=False).root
    c = generate_dataset(tmp_path / "c", 40, size=64, seed=12, progress=False).root
    fa, fb, fc = _files(a), _files(b), _files(c)
    assert fa == fb
    assert fa["Data_Entry_2017.csv"] != fc["Data_Entry_2017.csv"]
    assert fa["images/00000001_000.png"] != fc["images/00000001_000.png"]


def test_parallel_workers_give_the_same_files(tmp_path):
    one = generate_dataset(tmp_path / "one", 24, size=64, seed=4, progress=False, chunk_size=5).root
    two = generate_dataset(tmp_path / "two", 24, size=64, seed=4, progress=False, workers=2, chunk_size=5).root
    assert _files(one) == _files(two)


def test_png_encoder_roundtrip():
    img = np.random.default_rng(0).integers(0, 256, (37, 53), dtype=np.uint8)
    with Image.open(io.BytesIO(writer.encode_png_gray(img))) as im:
        assert im.mode == "L" and im.size == (53, 37)
        np.testing.assert_array_equal(np.asarray(im), img)
    with pytest.raises(ValueError, match="uint8"):
        writer.encode_png_gray(img.astype(np.float32))


# --------------------------------------------------------------------------- label statistics
def test_label_statistics_within_stated_bounds():
    """Bounds of cohort.py's docstring: No Finding 0.5 +- 0.03, each finding within 20 % (+0.004) of its target."""
    jobs = plan_cohort(20000, seed=0)
    labels = cohort.label_matrix(jobs)
    assert abs((labels.sum(1) == 0).mean() - 0.5) < 0.03
    prevalence = labels.mean(0)
    for f, p in zip(FINDINGS, prevalence, strict=True):
        target = cohort.TARGET_PREVALENCE[f]
        assert abs(p - target) < 0.2 * target + 0.004, f"{f}: {p:.4f} vs target {target}"
    order = np.argsort(-prevalence)
    assert {FINDINGS[i] for i in order[:3]} == {"Infiltration", "Effusion", "Atelectasis"}
    assert FINDINGS[order[-1]] == "Hernia"
    assert labels[:, FINDINGS.index("Hernia")].sum() > 0.02 * len(jobs)
    # co-occurrence follows the real data: Effusion is more likely given Atelectasis than overall
    atel, effu = labels[:, FINDINGS.index("Atelectasis")] == 1, labels[:, FINDINGS.index("Effusion")] == 1
    assert effu[atel].mean() > 1.5 * effu.mean()
    # follow-ups: several images per patient on average
    assert 1.8 < len(jobs) / jobs[-1].patient < 2.8


def test_cooccurrence_table_matches_the_real_data_entry(sample_dir):
    entries = pd.read_csv(sample_dir / "Data_Entry_2017_v2020.csv.gz", usecols=["Finding Labels"])
    labels = np.stack([encode(s) for s in entries["Finding Labels"]]).astype(float)
    real = labels.T @ labels / labels.sum(0)[:, None]
    np.fill_diagonal(real, 0)
    np.testing.assert_allclose(cohort.REAL_COOCCURRENCE, real, atol=0.0051)


def test_label_model_weights_are_a_distribution():
    alpha, w = cohort.label_model()
    assert 0 < alpha < 3 and (w > 0).all() and abs(w.sum() - 1) < 1e-9


def test_small_dataset_every_finding_gets_a_box(dataset):
    root, result = dataset
    missing = [(j.name, k) for j, b in zip(result.jobs, result.boxes, strict=True) for k in j.kinds if k not in b]
    assert missing == []


# --------------------------------------------------------------------------- CLI and data layer
def test_cli_writes_refuses_to_clobber_and_overwrites(tmp_path, capsys):
    out = tmp_path / "d"
    assert main(["synth", "--out", str(out), "--images", "12", "--size", "64", "--no-progress"]) == 0
    assert "12 images of 64x64" in capsys.readouterr().out
    assert main(["synth", "--out", str(out), "--images", "12", "--size", "64", "--no-progress"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["synth", "--out", str(out), "--images", "8", "--size", "64", "--no-progress", "--overwrite"]) == 0
    assert len(list((out / "images").iterdir())) == 8
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("x")
    assert main(["synth", "--out", str(tmp_path / "other"), "--images", "8", "--overwrite", "--no-progress"]) == 2
    assert "not a synthetic dataset" in capsys.readouterr().err
    assert main(["synth", "--out", str(tmp_path / "e"), "--size", "16", "--no-progress"]) == 2
    assert "size must be" in capsys.readouterr().err


def test_cli_example_grid(tmp_path):
    path = tmp_path / "grid.png"
    assert main(["synth", "--examples", str(path)]) == 0
    with Image.open(path) as im:
        assert im.size == (5 * 160, 3 * 160)
    assert path.stat().st_size < 300_000


def test_prepare_reads_the_synthetic_folder_strictly(dataset, tmp_path):
    """`cxrloc prepare` (strict, the default) accepts the folder with no problem and keeps labels and boxes."""
    from cxrloc.data.prepare import prepare_cache

    root, result = dataset
    res = prepare_cache(root, tmp_path / "cache", size=64, workers=1, progress=False)
    assert res.report is not None and res.report.ok and res.report.count() == 0, res.report.summary()
    cache = res.cache
    assert len(cache) == N_IMAGES
    row_of = {name: i for i, name in enumerate(cache.image_ids)}
    for job in result.jobs:
        np.testing.assert_array_equal(cache.labels[row_of[job.name]], encode(job.kinds or "No Finding"))
        assert (cache.splits[row_of[job.name]] == "test") == (job.split == "test")
    assert len(cache.boxes) == len(pd.read_csv(root / "BBox_List_2017.csv"))
    assert (cache.orig_sizes == SIZE).all()


def test_blur_passes_match_the_requested_sigma():
    for sigma in (0.3, 0.7, 1.0, 2.5):
        n, w = blur_passes(sigma)
        assert 0 < w <= 0.25 and abs(2 * w * n - sigma**2) < 1e-9
    assert blur_passes(0.0) == (0, 0.0)


def test_follow_ups_share_anatomy_and_finding_place():
    jobs = plan_cohort(400, seed=2)
    by_patient = {}
    for j in jobs:
        by_patient.setdefault(j.patient, []).append(j)
    pair = next(v for v in by_patient.values() if len(v) > 1 and set(v[0].kinds) & set(v[1].kinds) - {"Cardiomegaly", "Emphysema"})
    (p0, f0), (p1, f1) = phantom_for(pair[0], 2), phantom_for(pair[1], 2)
    assert p0.anatomy == p1.anatomy and p0.acquisition != p1.acquisition
    shared = (set(pair[0].kinds) & set(pair[1].kinds)) - {"Cardiomegaly", "Emphysema"}
    a = next(f for f in f0 if f.kind in shared)
    b = next(f for f in f1 if f.kind == a.kind)
    assert (a.cx, a.cy, a.side) == (b.cx, b.cy, b.side)
    assert dataclasses.replace(a, rx=b.rx, ry=b.ry, strength=b.strength) == b


def test_hard_is_not_solved_by_a_linear_probe_while_medium_is_easier(tmp_path):
    """Issue 3: a linear probe on raw pixels must not solve "hard". Same probe, same cohort, both difficulties.

    (1,500 images at 64 px, 16x16 pixels; benchmarks/synth.py measures 3,000 images at 128 px.)
    """
    from cxrloc.data.synth.probe import linear_probe

    scores = {}
    for difficulty in ("medium", "hard"):
        root = generate_dataset(tmp_path / difficulty, 1500, size=64, seed=1, difficulty=difficulty, progress=False).root
        scores[difficulty] = linear_probe(root, downsample=16)["mean_auc"]
    assert scores["hard"] < 0.72, scores
    assert scores["medium"] > scores["hard"] + 0.05, scores  # measured: medium 0.809, hard 0.665
