"""Triplet batches and validation shards of the data module (no Trainer, no model)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from train_builders import N_TRAIN, N_VAL, fast_config

from cxrloc.train.datamodule import CacheBatchDataset, CacheDataModule, EpochBatchSampler, RowChunkSampler


class _FakeTrainer:
    def __init__(self, rank: int, world_size: int, epoch: int = 0):
        self.global_rank, self.world_size, self.current_epoch = rank, world_size, epoch


def _module(cache, name: str = "dlrv", rank: int = 0, world_size: int = 1, *extra: str) -> CacheDataModule:
    dm = CacheDataModule(fast_config(name, *extra), cache)
    dm.trainer = _FakeTrainer(rank, world_size)  # type: ignore[assignment]
    dm.prepare_data()
    dm.setup("fit")
    return dm


@pytest.mark.parametrize("name", ["dlrv", "baseline"])
@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_every_train_image_is_an_anchor_once_per_epoch(tiny_cache, name, world_size):
    shards = [_module(tiny_cache, name, r, world_size).epoch_rows(epoch=1) for r in range(world_size)]
    per_rank = math.ceil(N_TRAIN / world_size)
    assert all(len(s) == per_rank for s in shards)  # equal step counts for DDP
    anchors = np.concatenate([s[:, 0] for s in shards])
    train = _module(tiny_cache, name).train_rows
    assert set(anchors) == set(train)
    assert len(anchors) - len(set(anchors)) == per_rank * world_size - N_TRAIN  # only the padding repeats
    assert shards[0].shape[1] == (3 if name == "dlrv" else 1)


def test_epoch_rows_are_deterministic_and_change_between_epochs(tiny_cache):
    a, b = _module(tiny_cache), _module(tiny_cache)
    assert np.array_equal(a.epoch_rows(2), b.epoch_rows(2))
    assert not np.array_equal(a.epoch_rows(2), a.epoch_rows(3))
    other_seed = _module(tiny_cache, "dlrv", 0, 1, "train.seed=9")
    assert not np.array_equal(a.epoch_rows(2), other_seed.epoch_rows(2))


def test_triplets_follow_the_label_rules(tiny_cache):
    dm = _module(tiny_cache)
    labels = dm.cache.labels.astype(bool)
    t = dm.epoch_rows(0)
    for a, _, n in t:  # negatives share no disease with the anchor (miner contract)
        assert not (labels[a] & labels[n]).any()
    assert set(t[:, 1]) <= set(dm.train_rows) and set(t[:, 2]) <= set(dm.train_rows)


def test_batches_are_anchors_then_positives_then_negatives(tiny_cache):
    dm = _module(tiny_cache)
    loader = dm.train_dataloader()
    batches = list(loader)
    assert len(batches) == len(loader) == math.ceil(N_TRAIN / 4)
    rows = dm.epoch_rows(0)
    first = batches[0]
    assert first["images"].dtype == torch.uint8 and first["images"].shape == (12, 64, 64)
    assert first["num_anchors"] == 4
    assert torch.equal(first["rows"], torch.from_numpy(np.concatenate([rows[:4, 0], rows[:4, 1], rows[:4, 2]])))
    assert torch.equal(first["images"][5], torch.from_numpy(np.array(dm.cache.images[rows[1, 1]])))
    assert torch.equal(first["labels"][9], torch.from_numpy(dm.cache.labels[rows[1, 2]]))
    last = batches[-1]
    assert last["num_anchors"] == N_TRAIN - 4 * (len(batches) - 1) and last["images"].shape[0] == 3 * last["num_anchors"]
    assert sum(b["num_anchors"] for b in batches) == N_TRAIN


def test_sampler_reads_the_epoch_when_iterated():
    calls = []

    def rows():
        calls.append(1)
        return np.arange(10).reshape(10, 1) + 100 * len(calls)

    sampler = EpochBatchSampler(rows, num_batches=3, batch_size=4)
    first, second = list(sampler), list(sampler)
    assert len(calls) == 2 and [len(b) for b in first] == [4, 4, 2]
    assert first[0][0] == 100 and second[0][0] == 200


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_validation_shards_cover_the_val_split_once(tiny_cache, world_size):
    seen = []
    for r in range(world_size):
        dm = _module(tiny_cache, "dlrv", r, world_size)
        for batch in dm.val_dataloader():
            seen += batch["rows"].tolist()
            assert batch["num_anchors"] == len(batch["rows"])
    assert sorted(seen) == sorted(dm.val_rows.tolist()) and len(seen) == N_VAL


def test_dataset_and_chunk_sampler(tiny_cache):
    dm = _module(tiny_cache, "baseline")
    ds = CacheBatchDataset(dm.cache, triplets=False)
    item = ds[np.array([3, 1, 3])]
    assert item["images"].shape == (3, 64, 64) and torch.equal(item["images"][0], item["images"][2])
    assert list(RowChunkSampler(np.arange(5), 2).__iter__())[-1].tolist() == [4]


def test_too_few_val_images_for_the_processes(tiny_cache):
    with pytest.raises(ValueError, match="val images for 20 processes"):
        _module(tiny_cache, "dlrv", 0, 20)


def test_next_epoch_is_mined_in_the_background_with_identical_rows(tiny_cache):
    dm = _module(tiny_cache, "dlrv", 0, 1, "train.max_epochs=3")
    first = dm.current_epoch_rows()  # epoch 0; starts mining epoch 1
    assert list(dm._jobs) == [(1, 0, 1)]
    dm.trainer.current_epoch = 1
    second = dm.current_epoch_rows()
    assert not dm._jobs or list(dm._jobs) == [(2, 0, 1)]
    assert np.array_equal(second, _module(tiny_cache, "dlrv", 0, 1, "train.max_epochs=3").epoch_rows(1))
    assert not np.array_equal(first, second)
    dm.trainer.current_epoch = 2
    dm.current_epoch_rows()
    assert (3, 0, 1) not in dm._jobs  # no epoch past max_epochs
    dm.teardown("fit")
    assert dm._executor is None
