"""A torch ``Dataset`` over a prepared cache, returning dict samples.

Each sample is ``{"image", "labels", "index", "image_id"}``:

- ``image``: with a transform, its output (e.g. (3, 224, 224) float32); without one,
  the raw cache row as a (S, S) uint8 tensor, which a DataLoader collates to
  (B, S, S) uint8 for :func:`cxrloc.data.transforms.batch_transform` on the GPU;
- ``labels``: (14,) float32 multi-hot in FINDINGS order (No Finding = zeros);
- ``index``: the cache row number (int), the key mining and evaluation use;
- ``image_id``: the file name, e.g. ``"00000001_000.png"``.

The image memmap is opened lazily in each DataLoader worker (:class:`Cache`
drops it when pickled), so workers share the page cache instead of copies.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from cxrloc.data.cache import Cache


class CacheDataset(Dataset):
    """Samples of a :class:`Cache`, optionally restricted to some rows.

    Args:
        cache: a Cache or its folder.
        split: ``"train"``, ``"val"`` or ``"test"`` (rows of that split), or None.
        indices: explicit cache rows (overrides ``split``), in the order to serve them.
        transform: called on the (S, S) uint8 numpy image; None returns the uint8 tensor.
    """

    def __init__(
        self,
        cache: Cache | str | Path,
        split: str | None = None,
        indices: Sequence[int] | np.ndarray | None = None,
        transform: Callable[[np.ndarray], Any] | None = None,
    ):
        self.cache = cache if isinstance(cache, Cache) else Cache(cache)
        if indices is not None:
            rows = np.asarray(indices, dtype=np.int64).reshape(-1)
            if rows.size and (rows.min() < 0 or rows.max() >= len(self.cache)):
                raise IndexError(f"indices out of range for a cache of {len(self.cache)} images")
        elif split is not None:
            rows = self.cache.indices(split)
        else:
            rows = np.arange(len(self.cache), dtype=np.int64)
        self.rows = rows
        self.transform = transform
        self._labels = torch.from_numpy(self.cache.labels.astype(np.float32))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = int(self.rows[i])
        image = np.asarray(self.cache.images[row])
        out = self.transform(image) if self.transform is not None else torch.from_numpy(image.copy())
        return {"image": out, "labels": self._labels[row].clone(), "index": row, "image_id": str(self.cache.image_ids[row])}


def load_batch(cache: Cache, rows: Sequence[int] | np.ndarray) -> dict[str, Any]:
    """Read many cache rows at once (one sorted memmap gather), without a DataLoader.

    Returns:
        ``image`` (B, S, S) uint8 tensor, ``labels`` (B, 14) float32, ``index`` (B,) int64,
        ``image_id`` list of B names, all in the order of ``rows``.
    """
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    order = np.argsort(rows, kind="stable")
    gathered = np.empty((len(rows), cache.size, cache.size), dtype=np.uint8)
    gathered[order] = cache.images[rows[order]]
    return {
        "image": torch.from_numpy(gathered),
        "labels": torch.from_numpy(cache.labels[rows].astype(np.float32)),
        "index": torch.from_numpy(rows.copy()),
        "image_id": [str(s) for s in cache.image_ids[rows]],
    }
