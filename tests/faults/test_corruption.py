"""Truncated or bit-flipped cache files and checkpoints: detected with a clear error, never used.

Cache: byte sizes and SHA-256 of every file are in ``meta.json``; sizes, ``index.csv`` and
``boxes.csv`` are checked at every open, ``images.npy`` by ``Cache.verify()``, which
training and evaluation call before using the cache. Checkpoints: the CRC-32 of every
record of the zip container is checked before anything is unpickled, and the SHA-256
of every weight tensor after. A damaged derived file (pHash index, predictions.npz) is
rebuilt, not trusted.
"""

from __future__ import annotations

import shutil
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from fault_tools import FAST_TRAIN, flip_bit, sha256, tree_state, truncate

from cxrloc.cli import main
from cxrloc.config import load_config
from cxrloc.data.cache import Cache, CacheError
from cxrloc.model.checkpoint import CheckpointError, load_checkpoint, load_model
from cxrloc.train import train

CACHE_FILES = ("images.npy", "index.csv", "boxes.csv", "meta.json")


def _open_and_verify(root: Path) -> Cache:
    cache = Cache(root)
    cache.verify()
    return cache


def _same_cache_content(a: Cache, b: Cache) -> bool:
    return (np.array_equal(a.images, b.images) and a.index.equals(b.index) and a.boxes.equals(b.boxes)
            and a.size == b.size and len(a) == len(b))


# --------------------------------------------------------------------------- cache


@pytest.mark.parametrize("name", CACHE_FILES)
def test_truncated_cache_file_is_refused(clean_cache, tmp_path, name):
    root = shutil.copytree(clean_cache, tmp_path / "cache")
    truncate(root / name, (root / name).stat().st_size // 2)
    with pytest.raises(CacheError, match=rf"{name}: "):
        _open_and_verify(root)


@pytest.mark.parametrize("name", CACHE_FILES)
def test_bit_flips_in_cache_files_are_detected(clean_cache, tmp_path, name):
    """12 seeded single-bit flips per file: each one is refused, or (meta.json only) changes nothing used."""
    reference = Cache(clean_cache)
    size = (clean_cache / name).stat().st_size
    rng = np.random.default_rng(sum(map(ord, name)))
    harmless = 0
    for k in range(12):
        root = tmp_path / f"c{k}"
        shutil.copytree(clean_cache, root)
        flip_bit(root / name, int(rng.integers(size)), int(rng.integers(8)))
        try:
            damaged = _open_and_verify(root)
        except CacheError as e:
            assert str(root) in str(e)  # the message names the folder and file
            continue
        assert name == "meta.json", f"flip {k} in {name} went undetected"
        assert _same_cache_content(damaged, reference), f"flip {k} in meta.json changed the data silently"
        harmless += 1
    assert harmless < 12


@pytest.mark.parametrize("key", ["format", "size", "count", "files", "images.npy", "index.csv", "bytes", "sha256"])
def test_damaged_meta_json_key_is_a_cache_error(clean_cache, tmp_path, key):
    """A flip in a key name of meta.json (where no checksum can guard it): CacheError, not KeyError/TypeError."""
    root = shutil.copytree(clean_cache, tmp_path / "cache")
    text = (root / "meta.json").read_bytes()
    flip_bit(root / "meta.json", text.index(f'"{key}"'.encode()) + 1, 1)
    with pytest.raises(CacheError, match=r"meta\.json: "):
        _open_and_verify(root)


def test_training_refuses_a_bit_flipped_cache(reference_run, tmp_path):
    root = shutil.copytree(reference_run.cache, tmp_path / "cache")
    flip_bit(root / "images.npy", (root / "images.npy").stat().st_size - 1000, 3)  # one pixel: same size
    Cache(root)  # opening alone cannot see it (sizes match) ...
    with pytest.raises(CacheError, match=r"images\.npy: checksum mismatch"):  # ... training verifies first
        train(load_config("dlrv", list(FAST_TRAIN)), root, tmp_path / "run", progress="none")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_evaluate_refuses_a_bit_flipped_cache(reference_run, tmp_path, capsys):
    root = shutil.copytree(reference_run.cache, tmp_path / "cache")
    flip_bit(root / "images.npy", 500, 0)
    rc = main(["evaluate", "--checkpoint", str(reference_run.run / "checkpoints/best.pt"), "--data", str(root),
               "--out", str(tmp_path / "report"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and "images.npy: checksum mismatch" in err and "Traceback" not in err
    assert not (tmp_path / "report").exists()


def test_damaged_phash_index_is_rebuilt(reference_run, tmp_path, caplog):
    from cxrloc.mining.phash import INDEX_FILE, INDEX_META, phash_index

    root = shutil.copytree(reference_run.cache, tmp_path / "cache")
    good = np.load(root / INDEX_FILE)
    flip_bit(root / INDEX_FILE, (root / INDEX_FILE).stat().st_size - 3, 5)
    np.testing.assert_array_equal(phash_index(Cache(root), progress=False), good)
    assert "checksum mismatch; rebuilding" in caplog.text
    (root / INDEX_META).write_text("{not json")
    np.testing.assert_array_equal(phash_index(Cache(root), progress=False), good)
    np.testing.assert_array_equal(np.load(root / INDEX_FILE), good)


def test_damaged_predictions_file_is_recomputed(reference_run, tmp_path, capsys):
    out = tmp_path / "report"
    args = ["evaluate", "--checkpoint", str(reference_run.run / "checkpoints/best.pt"), "--data",
            str(reference_run.cache), "--out", str(out), "--device", "cpu", "--bootstrap", "5", "--cv-folds", "2",
            "--examples", "0"]
    assert main(args) == 0
    first = capsys.readouterr().out
    truncate(out / "predictions.npz", 300)
    assert main(args) == 0
    assert "computed predictions" in capsys.readouterr().out and "computed predictions" in first
    assert main(args) == 0 and "reused predictions" in capsys.readouterr().out


# --------------------------------------------------------------------------- checkpoints


def _deep_equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_deep_equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(_deep_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and a != a:
        return isinstance(b, float) and b != b
    return type(a) is type(b) and a == b


@pytest.mark.parametrize("keep", [0, 100, 0.5, -1])
def test_truncated_checkpoint_is_refused(reference_run, tmp_path, keep):
    path = tmp_path / "last.pt"
    shutil.copy(reference_run.run / "checkpoints/last.pt", path)
    size = path.stat().st_size
    truncate(path, int(size * keep) if isinstance(keep, float) else (size + keep if keep < 0 else keep))
    with pytest.raises(CheckpointError, match=r"last\.pt: corrupt or truncated checkpoint"):
        load_checkpoint(path)


def test_bit_flips_anywhere_in_a_checkpoint_are_detected(reference_run, tmp_path):
    """A flip in the data of a record (pickled metadata, 30 sampled tensors: weights, Adam state ...) is refused;
    a flip anywhere else (zip headers, alignment padding, directory) is refused or changes nothing."""
    src = reference_run.run / "checkpoints/last.pt"
    raw = src.read_bytes()
    reference = load_checkpoint(src)
    with zipfile.ZipFile(src) as z:
        infos = [i for i in z.infolist() if i.compress_size]
    rng = np.random.default_rng(7)
    tensors = [i for i in infos if "/data/" in i.filename]
    infos = [i for i in infos if "/data/" not in i.filename] + [tensors[k] for k in rng.choice(len(tensors), 30)]
    inside = []
    for info in infos:
        name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26 : info.header_offset + 30])
        start = info.header_offset + 30 + name_len + extra_len
        inside.append(start + int(rng.integers(info.compress_size)))
    anywhere = [len(raw) - 10, len(raw) - 200, 20, *rng.integers(0, len(raw), 15).tolist()]
    path = tmp_path / "flipped.pt"
    for pos in inside + anywhere:
        shutil.copy(src, path)
        flip_bit(path, int(pos), int(rng.integers(8)))
        try:
            loaded = load_checkpoint(path)
        except CheckpointError as e:
            assert "flipped.pt: " in str(e)
            continue
        assert pos not in inside, f"flip at byte {pos}, inside a record, went undetected"
        assert _deep_equal(loaded, reference), f"flip at byte {pos} changed the checkpoint silently"
    assert {"archive/data.pkl", "archive/byteorder"} <= {i.filename for i in infos}


@pytest.fixture
def flipped_checkpoint(reference_run, tmp_path) -> Path:
    path = tmp_path / "ckpt" / "best.pt"
    path.parent.mkdir()
    shutil.copy(reference_run.run / "checkpoints/best.pt", path)
    with zipfile.ZipFile(path) as z:
        info = z.getinfo("archive/data.pkl")
    flip_bit(path, info.header_offset + 30 + len(info.filename) + 200, 1)  # inside the pickled metadata
    return path


def test_predict_and_evaluate_refuse_a_bit_flipped_checkpoint(flipped_checkpoint, reference_run, synth_data, tmp_path,
                                                              capsys):
    image = sorted((synth_data / "images").glob("*.png"))[0]
    rc = main(["predict", "--checkpoint", str(flipped_checkpoint), str(image), "--out", str(tmp_path / "pred"),
               "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and "best.pt: corrupt checkpoint: CRC-32 mismatch" in err, err
    assert not (tmp_path / "pred" / "predictions.json").exists()
    rc = main(["evaluate", "--checkpoint", str(flipped_checkpoint), "--data", str(reference_run.cache),
               "--out", str(tmp_path / "eval"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and "CRC-32 mismatch" in err and not (tmp_path / "eval").exists()
    with pytest.raises(CheckpointError, match="CRC-32 mismatch"):
        load_model(flipped_checkpoint)


def test_resume_refuses_a_bit_flipped_last_checkpoint(epoch1_copy, capsys):
    last = epoch1_copy / "checkpoints/last.pt"
    flip_bit(last, last.stat().st_size // 2, 4)
    before = tree_state(epoch1_copy)
    rc = main(["train", "--resume", str(epoch1_copy), "--progress", "none"])
    err = capsys.readouterr().err
    assert rc == 2 and "last.pt: corrupt checkpoint" in err, err
    assert tree_state(epoch1_copy) == before  # nothing overwritten, nothing trained
    assert sha256(last) == before["checkpoints/last.pt"][1]
