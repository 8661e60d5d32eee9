import numpy as np
import pandas as pd
import pytest

from cxrloc.data.cache import Cache, CacheError, write_cache
from cxrloc.labels import FINDINGS


def _tiny(tmp_path, n=6, s=16):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, s, s), dtype=np.uint8)
    index = pd.DataFrame({
        "image_id": [f"{i:08d}_000.png" for i in range(n)],
        "patient_id": np.arange(n),
        "split": ["train", "train", "val", "test", "test", "train"][:n],
        "orig_width": 1024, "orig_height": 1024,
        "labels": ["No Finding", "Mass", "Effusion|Mass", "Hernia", "No Finding", "Infiltration"][:n],
    })
    boxes = pd.DataFrame({"image_id": ["00000003_000.png"], "finding": ["Mass"], "x": [1.5], "y": [2.0], "w": [10.0], "h": [20.0]})
    return write_cache(tmp_path / "cache", images, index, boxes), images


def test_roundtrip(tmp_path):
    cache, images = _tiny(tmp_path)
    c = Cache(cache.root)
    assert len(c) == 6 and c.size == 16
    np.testing.assert_array_equal(c.images, images)
    assert c.labels.shape == (6, 14) and c.labels[2, FINDINGS.index("Effusion")] == 1
    assert c.labels[0].sum() == 0
    np.testing.assert_array_equal(c.indices("train"), [0, 1, 5])
    assert c.row("00000003_000.png") == 3
    assert c.boxes.iloc[0]["w"] == 10.0
    c.verify()
    import pickle
    c2 = pickle.loads(pickle.dumps(c))
    np.testing.assert_array_equal(c2.images[1], images[1])


def test_truncated_and_corrupt_detected(tmp_path):
    cache, _ = _tiny(tmp_path)
    p = cache.root / "images.npy"
    data = p.read_bytes()
    p.write_bytes(data[:-10])
    with pytest.raises(CacheError, match=r"images\.npy: .* bytes, meta\.json says"):
        Cache(cache.root)
    flipped = bytearray(data)
    flipped[-5] ^= 0xFF
    p.write_bytes(bytes(flipped))
    c = Cache(cache.root)  # same size: only the checksum finds it
    with pytest.raises(CacheError, match="checksum mismatch"):
        c.verify()


def test_unfinished_cache_is_refused(tmp_path):
    cache, _ = _tiny(tmp_path)
    (cache.root / "meta.json").unlink()
    with pytest.raises(CacheError, match="unfinished"):
        Cache(cache.root)
    with pytest.raises(CacheError, match="does not exist"):
        Cache(tmp_path / "nope")
