"""Batches for training and validation, read from the prepared cache (METHOD.md, Training).

Training batches hold the cache rows of ``batch_size`` triplets, laid out as
``[anchors; positives; negatives]`` (3 * batch_size uint8 images, one backbone pass),
or just the anchors when distance learning is off (baseline, "w/o DL"). Images stay
uint8 (R, S, S) until they reach the device; augmentation (rotation +-5 degrees,
horizontal flip) and normalisation run there on the whole batch
(:mod:`cxrloc.train.module`).

Every train image is an anchor exactly once per epoch (across all ranks):

* with distance learning, the epoch's triplets come from
  ``TripletMiner.epoch_triplets(epoch, rank, world_size)`` (one row per anchor);
* without it (ours), the anchors are a seeded permutation of the train rows, dealt
  round-robin to the ranks; no pHash index or candidate lists are built.

Ours: each rank's rows are then shuffled with a generator keyed by (seed, epoch, rank),
so batches differ between epochs whatever order the miner returns. Under DDP every rank
must run the same number of steps, so a rank whose shard is shorter than
``ceil(n_train / world_size)`` repeats its first rows to that length (at most one extra
anchor per rank, like ``DistributedSampler``); that is the only duplication.

The epoch used for mining is read from the trainer when the sampler is iterated, so the
batches of an epoch depend only on (seed, epoch, rank, world_size): a resumed run sees
the same triplets as an uninterrupted one. While an epoch trains, the next epoch's
triplets are mined in a background thread (numpy releases the GIL), so mining does not
stall the accelerator between epochs.

Validation covers every val image once: rank r takes ``val_rows[r::world_size]``
without padding; the module gathers the scores and checks the count.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from cxrloc.config import Config
from cxrloc.data.cache import Cache

log = logging.getLogger(__name__)

#: stream ids for :func:`derived_seed`, so the generators of one epoch never coincide
STREAM_ANCHOR_ORDER = 1
STREAM_SHARD_SHUFFLE = 2
STREAM_AUGMENT = 3
STREAM_GLOBAL = 4


def derived_seed(seed: int, epoch: int, rank: int, stream: int) -> int:
    """A 63-bit seed that depends only on (seed, epoch, rank, stream) (numpy SeedSequence)."""
    state = np.random.SeedSequence([int(seed), int(epoch), int(rank), int(stream)]).generate_state(1, np.uint64)[0]
    return int(state) & ((1 << 63) - 1)


class CacheBatchDataset(Dataset):
    """Map-style dataset whose index is an array of cache rows: one item = one whole batch.

    Args:
        cache: the prepared cache (pickles without its memmap; cheap to send to workers).
        triplets: True when the rows are ``[anchors; positives; negatives]``.

    ``dataset[rows]`` returns ``images`` (R, S, S) uint8, ``labels`` (R, 14) uint8,
    ``rows`` (R,) int64 and ``num_anchors`` (R // 3 with triplets, else R).
    """

    def __init__(self, cache: Cache, triplets: bool) -> None:
        self.cache = cache
        self.triplets = triplets

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, rows: np.ndarray) -> dict[str, Any]:
        rows = np.asarray(rows, dtype=np.int64)
        images = np.ascontiguousarray(self.cache.images[rows])  # one fancy read of the memmap
        return {
            "images": torch.from_numpy(images),
            "labels": torch.from_numpy(np.ascontiguousarray(self.cache.labels[rows])),
            "rows": torch.from_numpy(rows),
            "num_anchors": len(rows) // 3 if self.triplets else len(rows),
        }


class EpochBatchSampler(Sampler[np.ndarray]):
    """Yields the cache rows of each training batch of the current epoch.

    Args:
        epoch_rows: callable returning this rank's (T, 3) triplet rows (or (T, 1) anchor
            rows) for the current epoch; called once per ``iter``.
        num_batches: fixed number of batches per epoch (equal on every rank).
        batch_size: triplets (or anchors) per batch.

    Each yielded array is (3 b,) = [anchors; positives; negatives] or (b,) anchors.
    """

    def __init__(self, epoch_rows: Callable[[], np.ndarray], num_batches: int, batch_size: int) -> None:
        self.epoch_rows = epoch_rows
        self.num_batches = num_batches
        self.batch_size = batch_size

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[np.ndarray]:
        rows = self.epoch_rows()
        for i in range(self.num_batches):
            chunk = rows[i * self.batch_size : (i + 1) * self.batch_size]
            yield np.ascontiguousarray(chunk.T).reshape(-1)  # column-major: all anchors, then positives, ...


class RowChunkSampler(Sampler[np.ndarray]):
    """Yields fixed rows in chunks of ``batch_size`` (validation)."""

    def __init__(self, rows: np.ndarray, batch_size: int) -> None:
        self.rows = np.asarray(rows, dtype=np.int64)
        self.batch_size = batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.rows) / self.batch_size)

    def __iter__(self) -> Iterator[np.ndarray]:
        for start in range(0, len(self.rows), self.batch_size):
            yield self.rows[start : start + self.batch_size]


class CacheDataModule(L.LightningDataModule):
    """Training triplets (or anchors) and validation images from a prepared cache.

    Args:
        cfg: the run's config (``loss.use_dl``, ``mining``, ``train.batch_size``,
            ``train.seed``, ``data.num_workers``).
        data_root: the cache folder written by ``cxrloc prepare``.
        pin_memory: pin host batches (set for CUDA runs).
    """

    def __init__(self, cfg: Config, data_root: str | Path, pin_memory: bool = False) -> None:
        super().__init__()
        self.cfg = cfg
        self.data_root = Path(data_root)
        self.pin_memory = pin_memory
        self.cache: Cache | None = None
        self.miner: Any = None
        self.train_rows = np.zeros(0, np.int64)
        self.val_rows = np.zeros(0, np.int64)
        self._memo: tuple[tuple[int, int, int], np.ndarray] | None = None
        self._fallback_epoch = 0
        self._executor: ThreadPoolExecutor | None = None
        self._jobs: dict[tuple[int, int, int], Future] = {}

    # ------------------------------------------------------------------ Lightning hooks
    def prepare_data(self) -> None:
        """Build the stored pHash index once (rank 0) before the ranks read it."""
        if self._needs_hashes:
            from cxrloc.mining import phash_index

            phash_index(Cache(self.data_root))

    def setup(self, stage: str | None = None) -> None:
        if self.cache is not None:
            return
        cache = Cache(self.data_root)
        self.cache = cache
        self.train_rows = cache.indices("train")
        self.val_rows = cache.indices("val")
        if len(self.train_rows) == 0:
            raise ValueError(f"{self.data_root}: the cache has no 'train' images")
        if 0 < len(self.val_rows) < self.world_size:
            raise ValueError(
                f"{self.data_root}: {len(self.val_rows)} val images for {self.world_size} processes; "
                "every process needs at least one"
            )
        if self.cfg.loss.use_dl:
            from cxrloc.mining import TripletMiner, phash_index

            hashes = phash_index(cache) if self._needs_hashes else None
            self.miner = TripletMiner(cache.labels, hashes, self.train_rows, self.cfg.mining, self.cfg.train.seed)
        log.info("cache %s: %d train, %d val images", self.data_root, len(self.train_rows), len(self.val_rows))

    def train_dataloader(self) -> DataLoader:
        assert self.cache is not None, "setup() first"
        sampler = EpochBatchSampler(self.current_epoch_rows, self.num_train_batches, self.cfg.train.batch_size)
        return self._loader(CacheBatchDataset(self.cache, triplets=self.cfg.loss.use_dl), sampler)

    def val_dataloader(self) -> DataLoader:
        assert self.cache is not None, "setup() first"
        rows = self.val_rows[self.rank :: self.world_size]
        sampler = RowChunkSampler(rows, self.val_batch_size)
        return self._loader(CacheBatchDataset(self.cache, triplets=False), sampler)

    @property
    def _needs_hashes(self) -> bool:
        return self.cfg.loss.use_dl and self.cfg.mining.ordering == "phash"

    # ------------------------------------------------------------------ epoch rows
    @property
    def rank(self) -> int:
        return int(self.trainer.global_rank) if self.trainer is not None else 0

    @property
    def world_size(self) -> int:
        return int(self.trainer.world_size) if self.trainer is not None else 1

    @property
    def anchors_per_rank(self) -> int:
        """ceil(n_train / world_size): every rank's shard is padded to this length."""
        return math.ceil(len(self.train_rows) / self.world_size)

    @property
    def num_train_batches(self) -> int:
        return math.ceil(self.anchors_per_rank / self.cfg.train.batch_size)

    @property
    def val_batch_size(self) -> int:
        """Images per validation batch: as many as one training step sends through the backbone."""
        return self.cfg.train.batch_size * (3 if self.cfg.loss.use_dl else 1)

    def current_epoch(self) -> int:
        """The trainer's (absolute) epoch; resumed runs restore it before fitting."""
        return int(self.trainer.current_epoch) if self.trainer is not None else self._fallback_epoch

    def current_epoch_rows(self) -> np.ndarray:
        """Rows of the trainer's current epoch; with DL the next epoch is mined in a background thread."""
        epoch = self.current_epoch()
        rows = self.epoch_rows(epoch)
        if self.cfg.loss.use_dl and epoch + 1 < self.cfg.train.max_epochs:
            self._prefetch(epoch + 1)
        return rows

    def epoch_rows(self, epoch: int, rank: int | None = None, world_size: int | None = None) -> np.ndarray:
        """This rank's rows for ``epoch``: (A, 3) triplets with DL, else (A, 1) anchors; A = anchors_per_rank.

        Deterministic in (seed, epoch, rank, world_size); the last result is memoised, and a
        prefetched epoch is taken from its background job.
        """
        key = (int(epoch), self.rank if rank is None else rank, self.world_size if world_size is None else world_size)
        if self._memo is not None and self._memo[0] == key:
            return self._memo[1]
        job = self._jobs.pop(key, None)
        rows = job.result() if job is not None else self._compute_rows(*key)
        self._memo = (key, rows)
        return rows

    def teardown(self, stage: str | None = None) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor, self._jobs = None, {}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_executor"], state["_jobs"] = None, {}  # threads do not travel to spawned processes
        return state

    def _prefetch(self, epoch: int) -> None:
        """Mine ``epoch`` in a background thread (ours: hides mining time behind the current epoch's compute)."""
        key = (epoch, self.rank, self.world_size)
        if key in self._jobs or (self._memo is not None and self._memo[0] == key):
            return
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cxrloc-mining")
        self._jobs[key] = self._executor.submit(self._compute_rows, *key)

    def _compute_rows(self, epoch: int, rank: int, world_size: int) -> np.ndarray:
        seed = self.cfg.train.seed
        if self.cfg.loss.use_dl:
            rows = np.asarray(self.miner.epoch_triplets(epoch, rank, world_size), dtype=np.int64)
            if rows.ndim != 2 or rows.shape[1] != 3:
                raise RuntimeError(f"TripletMiner.epoch_triplets returned shape {rows.shape}, expected (T, 3)")
        else:
            order = np.random.default_rng(derived_seed(seed, epoch, 0, STREAM_ANCHOR_ORDER)).permutation(self.train_rows)
            rows = order[rank::world_size, None]
        shuffle = np.random.default_rng(derived_seed(seed, epoch, rank, STREAM_SHARD_SHUFFLE)).permutation(len(rows))
        rows = rows[shuffle]
        target = math.ceil(len(self.train_rows) / world_size)
        if len(rows) > target or len(rows) == 0:
            raise RuntimeError(
                f"epoch {epoch}, rank {rank}/{world_size}: {len(rows)} anchors in this shard, expected "
                f"{target} or one fewer (train split has {len(self.train_rows)} images)"
            )
        if len(rows) < target:  # equal step counts on every rank (DDP): repeat the first rows
            rows = np.concatenate([rows, rows[: target - len(rows)]])
        return rows

    # ------------------------------------------------------------------ internals
    def _loader(self, dataset: Dataset, sampler: Sampler) -> DataLoader:
        workers = self.cfg.data.num_workers
        return DataLoader(
            dataset,
            sampler=sampler,
            batch_size=None,  # the sampler yields whole batches
            num_workers=workers,
            pin_memory=self.pin_memory,
            persistent_workers=False,
            prefetch_factor=2 if workers > 0 else None,
        )
