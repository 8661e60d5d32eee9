import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest
from cxr14_builders import DEFAULT_ROWS, make_dataset

import cxrloc.data.prepare as prepare_module
from cxrloc.cli import main
from cxrloc.data.cache import Cache
from cxrloc.data.io import read_image_resized
from cxrloc.data.prepare import DONE_FILE, PARTIAL_FILE, STATE_FILE, prepare_cache
from cxrloc.data.report import DatasetValidationError
from cxrloc.labels import FINDINGS, encode

OUTPUT_FILES = ("images.npy", "index.csv", "boxes.csv", "report.json")
KW = dict(size=32, workers=1, chunk_size=2, progress=False)


def _files(root):
    return {name: (root / name).read_bytes() for name in OUTPUT_FILES}


def _meta_without_time(root):
    meta = json.loads((root / "meta.json").read_text())
    meta.pop("created")
    return meta


def test_prepare_tiny_folder(tmp_path):
    folder = make_dataset(tmp_path / "d")
    result = prepare_cache(tmp_path / "d", tmp_path / "c", **KW)
    cache = Cache(tmp_path / "c")
    cache.verify()
    assert not result.up_to_date and result.resumed_chunks == 0 and result.bad_images == []
    assert len(cache) == len(DEFAULT_ROWS) and cache.size == 32
    assert cache.image_ids.tolist() == [r[0] for r in DEFAULT_ROWS]  # Data_Entry order
    for i, (name, labels, patient, official) in enumerate(DEFAULT_ROWS):
        expected, size = read_image_resized(folder / name, 32)
        np.testing.assert_array_equal(cache.images[i], expected)
        np.testing.assert_array_equal(cache.labels[i], encode(labels))
        assert tuple(cache.orig_sizes[i]) == size == (48, 48) and cache.patient_ids[i] == patient
        assert (cache.splits[i] == "test") == (official == "test")
    assert len(cache.indices("val")) >= 1 and len(cache.indices("train")) >= 1
    assert cache.boxes["finding"].tolist() == ["Atelectasis", "Infiltration", "Pneumonia"]
    report = json.loads((tmp_path / "c" / "report.json").read_text())
    assert report["ok"] and report["stats"]["cached_images"] == len(DEFAULT_ROWS)
    assert cache.meta["source"]["size"] == 32 and cache.meta["source"]["split_seed"] == 0
    assert not any((tmp_path / "c" / n).exists() for n in (PARTIAL_FILE, STATE_FILE, DONE_FILE))


def test_second_run_is_noop_and_changes_rebuild(tmp_path):
    folder = make_dataset(tmp_path / "d")
    prepare_cache(tmp_path / "d", tmp_path / "c", **KW)
    stamps = {n: os.stat(tmp_path / "c" / n).st_mtime_ns for n in (*OUTPUT_FILES, "meta.json")}
    again = prepare_cache(tmp_path / "d", tmp_path / "c", **KW)
    assert again.up_to_date and len(again.cache) == len(DEFAULT_ROWS)
    assert stamps == {n: os.stat(tmp_path / "c" / n).st_mtime_ns for n in stamps}
    other = prepare_cache(tmp_path / "d", tmp_path / "c", **{**KW, "size": 24})  # other arguments: rebuild
    assert not other.up_to_date and other.cache.size == 24 and other.cache.images.shape[1:] == (24, 24)
    other = prepare_cache(tmp_path / "d", tmp_path / "c", **{**KW, "size": 24, "split_seed": 3})
    assert not other.up_to_date and other.cache.meta["source"]["split_seed"] == 3
    (folder / "00000002_000.png").write_bytes((folder / "00000001_000.png").read_bytes())  # changed source
    changed = prepare_cache(tmp_path / "d", tmp_path / "c", **{**KW, "size": 24, "split_seed": 3})
    assert not changed.up_to_date
    np.testing.assert_array_equal(changed.cache.images[2], changed.cache.images[0])


def test_bad_images_are_skipped_consistently(tmp_path):
    folder = make_dataset(tmp_path / "d")
    data = (folder / "00000008_001.png").read_bytes()
    (folder / "00000008_001.png").write_bytes(data[: len(data) // 2])  # truncated box image
    (folder / "00000004_000.png").write_bytes(b"garbage")
    result = prepare_cache(tmp_path / "d", tmp_path / "c1", **KW)  # strict: validation passes, decoding skips
    assert len(result.bad_images) == 2
    assert "00000004_000.png: not a readable image" in result.bad_images[0]
    assert "00000008_001.png: corrupt or truncated" in result.bad_images[1]
    cache = result.cache
    assert len(cache) == len(DEFAULT_ROWS) - 2
    assert "00000008_001.png" not in cache.image_ids and "00000004_000.png" not in cache.image_ids
    assert cache.boxes["image_id"].tolist() == ["00000008_000.png"]
    ok_names = [r[0] for r in DEFAULT_ROWS if r[0] not in ("00000004_000.png", "00000008_001.png")]
    for i, name in enumerate(ok_names):
        np.testing.assert_array_equal(cache.images[i], read_image_resized(folder / name, 32)[0])
    report = json.loads((tmp_path / "c1" / "report.json").read_text())
    assert report["problems"]["bad_image"]["count"] == 2
    assert prepare_cache(tmp_path / "d", tmp_path / "c1", **KW).up_to_date
    prepare_cache(tmp_path / "d", tmp_path / "c2", **{**KW, "workers": 2, "chunk_size": 5})
    assert _files(tmp_path / "c1") == _files(tmp_path / "c2")  # workers and chunking do not change the result


def test_strict_refuses_problems_lenient_proceeds(tmp_path):
    make_dataset(tmp_path / "d", extra_entry_lines=["00000011_000.png,Effusion|Headache,0,11,50,M,PA,1,1,1,1"])
    with pytest.raises(DatasetValidationError, match=r"(?s)unknown_label.*Data_Entry_2017.csv:14: 00000011_000.png.*--lenient"):
        prepare_cache(tmp_path / "d", tmp_path / "c", **KW)
    assert not (tmp_path / "c" / "meta.json").exists()
    result = prepare_cache(tmp_path / "d", tmp_path / "c", lenient=True, **KW)
    assert len(result.cache) == len(DEFAULT_ROWS)
    report = json.loads((tmp_path / "c" / "report.json").read_text())
    assert not report["ok"] and report["problems"]["unknown_label"]["count"] == 1


_KILL_DRIVER = textwrap.dedent(
    """
    import os, signal, sys
    import cxrloc.data.prepare as p
    def hook(n):
        if n == int(sys.argv[3]):
            os.kill(os.getpid(), signal.SIGKILL)
    p._after_chunk_hook = hook
    p.prepare_cache(sys.argv[1], sys.argv[2], size=32, workers=int(sys.argv[4]), chunk_size=2, progress=False)
    """
)


def _killed_run(data, out, after_chunks, workers=1):
    log = out.parent / f"{out.name}.log"  # a file, not a pipe: nothing can hold it open after the kill
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-c", _KILL_DRIVER, str(data), str(out), str(after_chunks), str(workers)], stdout=f, stderr=f, timeout=120)
    assert proc.returncode == -9, log.read_text()


def test_sigkilled_run_resumes_to_identical_files(tmp_path):
    make_dataset(tmp_path / "d")
    prepare_cache(tmp_path / "d", tmp_path / "clean", **KW)
    _killed_run(tmp_path / "d", tmp_path / "c", after_chunks=2)
    assert (tmp_path / "c" / PARTIAL_FILE).exists() and not (tmp_path / "c" / "meta.json").exists()
    assert len((tmp_path / "c" / DONE_FILE).read_text().splitlines()) == 2
    with open(tmp_path / "c" / DONE_FILE, "a") as f:
        f.write('{"chunk": 5, "sizes": [[48, 4')  # a marker line torn by the kill
    result = prepare_cache(tmp_path / "d", tmp_path / "c", **KW)
    assert result.resumed_chunks == 2 and not result.up_to_date
    assert _files(tmp_path / "c") == _files(tmp_path / "clean")
    assert _meta_without_time(tmp_path / "c") == _meta_without_time(tmp_path / "clean")
    assert prepare_cache(tmp_path / "d", tmp_path / "c", **KW).up_to_date


def test_sigkill_with_worker_pool_then_resume(tmp_path):
    make_dataset(tmp_path / "d")
    prepare_cache(tmp_path / "d", tmp_path / "clean", **KW)
    _killed_run(tmp_path / "d", tmp_path / "c", after_chunks=3, workers=2)
    result = prepare_cache(tmp_path / "d", tmp_path / "c", **KW)
    assert result.resumed_chunks >= 3
    assert _files(tmp_path / "c") == _files(tmp_path / "clean")


def test_crash_after_images_before_meta(tmp_path, monkeypatch):
    make_dataset(tmp_path / "d")
    prepare_cache(tmp_path / "d", tmp_path / "clean", **KW)

    def boom(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(prepare_module, "finalize_cache", boom)
    with pytest.raises(OSError, match="simulated"):
        prepare_cache(tmp_path / "d", tmp_path / "c", **KW)
    assert (tmp_path / "c" / "images.npy").exists() and not (tmp_path / "c" / PARTIAL_FILE).exists()
    monkeypatch.undo()
    result = prepare_cache(tmp_path / "d", tmp_path / "c", **KW)
    assert result.resumed_chunks == 6
    assert _files(tmp_path / "c") == _files(tmp_path / "clean")


def test_changed_arguments_discard_partial_state(tmp_path):
    make_dataset(tmp_path / "d")
    _killed_run(tmp_path / "d", tmp_path / "c", after_chunks=1)
    result = prepare_cache(tmp_path / "d", tmp_path / "c", **{**KW, "size": 16})
    assert result.resumed_chunks == 0 and result.cache.size == 16


def test_cli_prepare(tmp_path, capsys):
    make_dataset(tmp_path / "d", extra_entry_lines=["00000011_000.png,Mass,0,11,50,M,PA,1,1,1,1"])  # absent image
    args = ["prepare", "--data-dir", str(tmp_path / "d"), "--out", str(tmp_path / "c"), "--size", "32", "--workers", "1", "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "listed_absent" in err and "00000011_000.png (Data_Entry line 14)" in err and "Traceback" not in err
    assert main([*args, "--lenient"]) == 0
    out = capsys.readouterr().out
    assert f"{len(DEFAULT_ROWS)} images of 32x32" in out and "report:" in out
    assert main([*args, "--lenient"]) == 0
    assert "up to date" in capsys.readouterr().out


def test_prepare_real_sample(sample_dir, tmp_path, capsys):
    args = ["prepare", "--data-dir", str(sample_dir), "--out", str(tmp_path / "c"), "--size", "64", "--workers", "1", "--lenient", "--no-progress"]
    assert main(args) == 0
    cache = Cache(tmp_path / "c")
    originals = pd.read_csv(sample_dir / "sample_index.csv")
    originals = originals[originals["is_original"] == 1]
    assert len(originals) == 10
    for row in originals.itertuples():
        i = cache.row(row._1)
        np.testing.assert_array_equal(cache.labels[i], encode(row._2))
        assert tuple(cache.orig_sizes[i]) == (1024, 1024)
        np.testing.assert_array_equal(cache.images[i], read_image_resized(sample_dir / row.file, 64)[0])
    assert cache.splits[cache.row("00000001_000.png")] in ("train", "val")
    assert cache.splits[cache.row("00000003_000.png")] == "test"
    boxes = cache.boxes.set_index("image_id")
    assert sorted(boxes.index) == ["00000032_037.png", "00000150_002.png"]
    assert boxes.loc["00000032_037.png", "finding"] == "Infiltration" and abs(boxes.loc["00000150_002.png", "x"] - 601.40) < 0.01
    report = json.loads((tmp_path / "c" / "report.json").read_text())
    absent = report["problems"]["listed_absent"]
    assert absent["count"] == 112_120 - len(cache) and len(absent["examples"]) == 50
    assert report["stats"]["data_entry_rows"] == 112_120
    assert set(FINDINGS) <= set(pd.read_csv(tmp_path / "c" / "index.csv").columns)
    capsys.readouterr()
    assert main(args) == 0
    assert "up to date" in capsys.readouterr().out


def test_cli_defaults_match_library():
    from cxrloc.commands import prepare as command

    assert (command.DEFAULT_SIZE, command.DEFAULT_CHUNK) == (prepare_module.DEFAULT_SIZE, prepare_module.DEFAULT_CHUNK) == (256, 64)
