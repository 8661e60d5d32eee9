import pickle

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from cxrloc.config import DataConfig
from cxrloc.data.cache import write_cache
from cxrloc.data.dataset import CacheDataset, load_batch
from cxrloc.data.transforms import batch_transform, eval_transform
from cxrloc.labels import FINDINGS


@pytest.fixture
def cache(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 40, 40), dtype=np.uint8)
    index = pd.DataFrame({
        "image_id": [f"{i:08d}_000.png" for i in range(6)],
        "patient_id": np.arange(6),
        "split": ["train", "train", "val", "test", "test", "train"],
        "orig_width": 1024, "orig_height": 1024,
        "labels": ["No Finding", "Mass", "Effusion|Mass", "Hernia", "No Finding", "Infiltration"],
    })
    return write_cache(tmp_path / "cache", images, index)


def test_samples_are_dicts(cache):
    ds = CacheDataset(cache)
    assert len(ds) == 6
    s = ds[2]
    assert set(s) == {"image", "labels", "index", "image_id"}
    assert s["image"].dtype == torch.uint8 and s["image"].shape == (40, 40)
    np.testing.assert_array_equal(s["image"].numpy(), cache.images[2])
    assert s["labels"].dtype == torch.float32 and s["labels"].shape == (14,)
    assert s["labels"][FINDINGS.index("Effusion")] == 1 and s["labels"][FINDINGS.index("Mass")] == 1 and s["labels"].sum() == 2
    assert s["index"] == 2 and s["image_id"] == "00000002_000.png"
    assert ds[0]["labels"].sum() == 0  # No Finding


def test_split_indices_and_transform(cache):
    train = CacheDataset(cache.root, split="train", transform=eval_transform(DataConfig(image_size=32)))
    assert len(train) == 3 and [train[i]["index"] for i in range(3)] == [0, 1, 5]
    assert train[0]["image"].shape == (3, 32, 32) and train[0]["image"].dtype == torch.float32
    picked = CacheDataset(cache, indices=[4, 1])
    assert [picked[i]["image_id"] for i in range(2)] == ["00000004_000.png", "00000001_000.png"]
    with pytest.raises(IndexError):
        CacheDataset(cache, indices=[6])


def test_dataloader_collates_uint8_batches_for_gpu_augmentation(cache):
    loader = DataLoader(CacheDataset(cache, split="train"), batch_size=3)
    batch = next(iter(loader))
    assert batch["image"].shape == (3, 40, 40) and batch["image"].dtype == torch.uint8
    assert batch["labels"].shape == (3, 14) and batch["index"].tolist() == [0, 1, 5]
    assert batch["image_id"] == ["00000000_000.png", "00000001_000.png", "00000005_000.png"]
    x = batch_transform(batch["image"], DataConfig(image_size=32), train=True, generator=torch.Generator().manual_seed(0))
    assert x.shape == (3, 3, 32, 32)


def test_pickles_without_the_memmap(cache):
    ds = CacheDataset(cache)
    ds[0]  # opens the memmap here
    assert ds.cache._images is not None
    clone = pickle.loads(pickle.dumps(ds))
    assert clone.cache._images is None  # a worker reopens it lazily
    np.testing.assert_array_equal(clone[3]["image"].numpy(), cache.images[3])


def test_load_batch_keeps_order(cache):
    b = load_batch(cache, [5, 0, 3])
    assert b["image"].shape == (3, 40, 40) and b["index"].tolist() == [5, 0, 3]
    np.testing.assert_array_equal(b["image"][0].numpy(), cache.images[5])
    np.testing.assert_array_equal(b["image"][1].numpy(), cache.images[0])
    assert b["image_id"] == ["00000005_000.png", "00000000_000.png", "00000003_000.png"]
    assert b["labels"][0, FINDINGS.index("Infiltration")] == 1
