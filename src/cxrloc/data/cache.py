"""The prepared cache: resized uint8 images in one memory-mappable array plus an index table.

Layout of a cache folder (written by ``cxrloc prepare``; read by mining, training
and evaluation, which never touch the PNG folder)::

    CACHE/
      images.npy   uint8 (N, S, S), row i = image i of index.csv; np.load(mmap_mode="r")
      index.csv    image_id, patient_id, split (train|val|test), orig_width, orig_height,
                   then one 0/1 column per finding in FINDINGS order
      boxes.csv    image_id, finding, x, y, w, h  (ground-truth boxes, original pixel coords)
      meta.json    format, size, count, byte sizes and SHA-256 of the three files above, source
      report.json  problems found while preparing (bad files skipped, unlisted images, ...)

``meta.json`` is written last, so a folder without it is an unfinished cache.
Sizes are checked every time a cache is opened (cheap); checksums on request
(:meth:`Cache.verify`) and by ``prepare`` after writing.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxrloc import __version__
from cxrloc.fileio import atomic_open, atomic_write_json, sha256_file
from cxrloc.labels import FINDINGS, NUM_FINDINGS

CACHE_FORMAT = 1
IMAGES_FILE = "images.npy"
INDEX_FILE = "index.csv"
BOXES_FILE = "boxes.csv"
META_FILE = "meta.json"
REPORT_FILE = "report.json"
SPLITS = ("train", "val", "test")
INDEX_COLUMNS = ("image_id", "patient_id", "split", "orig_width", "orig_height", *FINDINGS)
BOX_COLUMNS = ("image_id", "finding", "x", "y", "w", "h")


class CacheError(RuntimeError):
    """The cache folder is missing, unfinished, truncated or corrupt; the message names the file."""


class Cache:
    """Read access to a prepared cache folder.

    Args:
        root: the cache folder.

    Attributes:
        size: side S of the square cached images.
        image_ids, patient_ids, splits: (N,) arrays.
        labels: (N, 14) uint8 multi-hot in FINDINGS order.
        orig_sizes: (N, 2) int (width, height) of the original images.
        boxes: DataFrame with BOX_COLUMNS (original pixel coordinates).

    The image array is opened lazily as a read-only memmap (:attr:`images`), and
    dropped when pickled, so the object is cheap to send to DataLoader workers.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        meta_path = self.root / META_FILE
        if not self.root.is_dir():
            raise CacheError(f"{self.root}: cache folder does not exist (run `cxrloc prepare` first)")
        if not meta_path.exists():
            raise CacheError(f"{meta_path}: missing; the cache is unfinished (rerun `cxrloc prepare` to complete it)")
        try:
            self.meta: dict[str, Any] = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CacheError(f"{meta_path}: not valid JSON ({e})") from e
        if not isinstance(self.meta, dict) or self.meta.get("format") != CACHE_FORMAT:
            found = self.meta.get("format") if isinstance(self.meta, dict) else self.meta
            raise CacheError(f"{meta_path}: cache format {found!r}, this version reads {CACHE_FORMAT}")
        _check_meta(meta_path, self.meta)
        self.size = int(self.meta["size"])
        self._check_sizes()
        self.verify((INDEX_FILE, BOXES_FILE))  # small files: checksummed at every open (images.npy: verify())
        index = _read_csv(self.root / INDEX_FILE, INDEX_COLUMNS)
        if len(index) != self.meta["count"]:
            raise CacheError(f"{self.root / INDEX_FILE}: {len(index)} rows, meta.json says {self.meta['count']}")
        self.index = index
        try:
            self.image_ids = index["image_id"].to_numpy(dtype=str)
            self.patient_ids = index["patient_id"].to_numpy(dtype=np.int64)
            self.splits = index["split"].to_numpy(dtype=str)
            self.orig_sizes = index[["orig_width", "orig_height"]].to_numpy(dtype=np.int64)
            self.labels = index[list(FINDINGS)].to_numpy(dtype=np.uint8)
        except (ValueError, TypeError) as e:
            raise CacheError(f"{self.root / INDEX_FILE}: malformed values ({e})") from e
        self.boxes = _read_csv(self.root / BOXES_FILE, BOX_COLUMNS)
        self._row_of: dict[str, int] | None = None
        self._images: np.ndarray | None = None

    # ------------------------------------------------------------------ access
    def __len__(self) -> int:
        return int(self.meta["count"])

    @property
    def images(self) -> np.ndarray:
        """(N, S, S) uint8 read-only memmap."""
        if self._images is None:
            try:  # never unpickles: a memmap refuses object arrays
                arr = np.load(self.root / IMAGES_FILE, mmap_mode="r")
            except (ValueError, OSError, EOFError) as e:
                raise CacheError(f"{self.root / IMAGES_FILE}: not a readable uint8 array ({e})") from e
            if arr.shape != (len(self), self.size, self.size) or arr.dtype != np.uint8:
                raise CacheError(f"{self.root / IMAGES_FILE}: shape {arr.shape} {arr.dtype}, expected ({len(self)}, {self.size}, {self.size}) uint8")
            self._images = arr
        return self._images

    def indices(self, split: str) -> np.ndarray:
        """Row numbers (int64) of one split, in cache order."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        return np.flatnonzero(self.splits == split).astype(np.int64)

    def row(self, image_id: str) -> int:
        """Row number of an image id (e.g. ``"00000001_000.png"``)."""
        if self._row_of is None:
            self._row_of = {name: i for i, name in enumerate(self.image_ids)}
        try:
            return self._row_of[image_id]
        except KeyError:
            raise KeyError(f"{image_id!r} is not in the cache {self.root}") from None

    def verify(self, names: tuple[str, ...] = (IMAGES_FILE, INDEX_FILE, BOXES_FILE)) -> None:
        """Recompute the SHA-256 of the files (default: all) and compare with meta.json; CacheError on mismatch."""
        for name in names:
            expected = self.meta["files"][name]["sha256"]
            got = sha256_file(self.root / name)
            if got != expected:
                raise CacheError(f"{self.root / name}: checksum mismatch (file corrupt or modified; rerun `cxrloc prepare`)")

    # ------------------------------------------------------------------ pickling
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_images"] = None  # reopen the memmap in the receiving process
        return state

    def _check_sizes(self) -> None:
        files = self.meta.get("files", {})
        for name in (IMAGES_FILE, INDEX_FILE, BOXES_FILE):
            path = self.root / name
            if not path.exists():
                raise CacheError(f"{path}: missing from the cache")
            expected = files[name]["bytes"]
            if path.stat().st_size != expected:
                raise CacheError(f"{path}: {path.stat().st_size} bytes, meta.json says {expected} (truncated or modified)")


def _check_meta(path: Path, meta: dict[str, Any]) -> None:
    """Raise CacheError unless meta.json has a size, a count and the byte size + SHA-256 of each file."""
    problems = [k for k in ("size", "count") if not isinstance(meta.get(k), int) or meta[k] < 0]
    files = meta.get("files")
    for name in (IMAGES_FILE, INDEX_FILE, BOXES_FILE):
        entry = files.get(name) if isinstance(files, dict) else None
        if not (isinstance(entry, dict) and isinstance(entry.get("bytes"), int) and isinstance(entry.get("sha256"), str)):
            problems.append(f"files.{name}")
    if problems:
        raise CacheError(f"{path}: malformed (bad or missing {', '.join(problems)}); rerun `cxrloc prepare`")


def empty_boxes() -> pd.DataFrame:
    """An empty boxes table with the right columns."""
    return pd.DataFrame({c: pd.Series(dtype=float if c in "xywh" else str) for c in BOX_COLUMNS})


def write_cache(
    root: str | Path,
    images: np.ndarray,
    index: pd.DataFrame,
    boxes: pd.DataFrame | None = None,
    source: dict[str, Any] | None = None,
) -> Cache:
    """Write a complete cache from in-memory arrays (tests, small datasets). Atomic per file.

    Args:
        images: (N, S, S) uint8.
        index: N rows with INDEX_COLUMNS (label columns may be missing if a ``labels``
            column of ``"A|B"`` strings is given instead).
        boxes: rows with BOX_COLUMNS, or None.
    """
    images = np.asarray(images)
    if images.ndim != 3 or images.shape[1] != images.shape[2] or images.dtype != np.uint8:
        raise ValueError(f"images must be (N, S, S) uint8, got {images.shape} {images.dtype}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / META_FILE).unlink(missing_ok=True)  # the folder is unfinished until meta.json is back
    with atomic_open(root / IMAGES_FILE) as f:
        np.save(f, np.ascontiguousarray(images))
    return finalize_cache(root, index, boxes, size=images.shape[1], source=source)


def finalize_cache(
    root: str | Path,
    index: pd.DataFrame,
    boxes: pd.DataFrame | None,
    size: int,
    source: dict[str, Any] | None = None,
) -> Cache:
    """Write index.csv, boxes.csv and (last) meta.json beside an already complete images.npy."""
    root = Path(root)
    index = normalize_index(index)
    boxes = empty_boxes() if boxes is None else boxes.loc[:, list(BOX_COLUMNS)].reset_index(drop=True)
    with atomic_open(root / INDEX_FILE, "w") as f:
        index.to_csv(f, index=False, lineterminator="\n")
    with atomic_open(root / BOXES_FILE, "w") as f:
        boxes.to_csv(f, index=False, lineterminator="\n", float_format="%.4f")
    files = {}
    for name in (IMAGES_FILE, INDEX_FILE, BOXES_FILE):
        p = root / name
        files[name] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
    meta = {
        "format": CACHE_FORMAT,
        "size": int(size),
        "count": len(index),
        "files": files,
        "source": source or {},
        "cxrloc_version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    atomic_write_json(root / META_FILE, meta)
    return Cache(root)


def normalize_index(index: pd.DataFrame) -> pd.DataFrame:
    """Return ``index`` with exactly INDEX_COLUMNS in order (expands a ``labels`` string column)."""
    index = index.copy()
    if "labels" in index.columns and not set(FINDINGS) <= set(index.columns):
        from cxrloc.labels import encode

        multi = np.stack([encode(s) for s in index["labels"]]) if len(index) else np.zeros((0, NUM_FINDINGS), np.uint8)
        for j, name in enumerate(FINDINGS):
            index[name] = multi[:, j]
    missing = [c for c in INDEX_COLUMNS if c not in index.columns]
    if missing:
        raise ValueError(f"index is missing columns {missing}")
    bad = set(index["split"]) - set(SPLITS)
    if bad:
        raise ValueError(f"index has unknown split values {sorted(bad)}; expected {SPLITS}")
    index = index.loc[:, list(INDEX_COLUMNS)].reset_index(drop=True)
    for name in FINDINGS:
        index[name] = index[name].astype(np.uint8)
    return index


def _read_csv(path: Path, columns: tuple[str, ...]) -> pd.DataFrame:
    if not path.exists():
        raise CacheError(f"{path}: missing from the cache")
    try:
        df = pd.read_csv(path, dtype={"image_id": str, "split": str, "finding": str})
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as e:
        raise CacheError(f"{path}: cannot be parsed ({e})") from e
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise CacheError(f"{path}: missing columns {missing}")
    return df
