"""``cxrloc prepare``: dataset folder -> resized uint8 cache (resumable, parallel, deterministic).

Steps: read and validate the folder (:func:`~cxrloc.data.chestxray14.read_dataset`;
strict unless ``lenient``), decode + resize every usable image into a preallocated
``images.npy.partial`` (``np.lib.format.open_memmap``) in chunks, one chunk per task
of a process pool, then drop undecodable rows, rename to ``images.npy`` and write
``index.csv``, ``boxes.csv``, ``report.json`` and (last) ``meta.json``.

Resuming: ``prepare_state.json`` records what is being built (a fingerprint of the
source files and arguments) and ``chunks.done`` gets one JSON line per finished
chunk, appended and fsynced only after that chunk's rows are flushed. A killed run
(even SIGKILL) therefore continues where it stopped, and because every row is a
pure function of its file, the result is byte-identical to an uninterrupted run.
A finished cache whose ``meta.json`` carries the same fingerprint makes the run a
no-op; a changed source or argument rebuilds it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import multiprocessing
import os
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from cxrloc.data.cache import IMAGES_FILE, META_FILE, REPORT_FILE, Cache, CacheError, finalize_cache
from cxrloc.data.chestxray14 import DATA_ENTRY_NAMES, ChestXray14, read_dataset
from cxrloc.data.io import DEFAULT_MAX_PIXELS
from cxrloc.data.prepare_worker import close_partial, process_chunk, worker_init
from cxrloc.data.report import ValidationReport
from cxrloc.fileio import (
    NO_SPACE_ERRNOS,
    atomic_write_json,
    atomic_write_text,
    no_space_error,
    remove_stale_temporaries,
)
from cxrloc.labels import FINDINGS

log = logging.getLogger(__name__)

PARTIAL_FILE = "images.npy.partial"
STATE_FILE = "prepare_state.json"
DONE_FILE = "chunks.done"
DEFAULT_SIZE = 256
DEFAULT_CHUNK = 64

#: Test hook: called in the main process after each chunk is marked done, with the number of
#: chunks finished in this run (used to simulate a crash at a known point).
_after_chunk_hook: Callable[[int], None] | None = None


@dataclass
class PrepareResult:
    """What :func:`prepare_cache` did.

    Attributes:
        cache: the finished cache.
        up_to_date: True when nothing had to be done (same source and arguments).
        resumed_chunks: chunks found already done from an interrupted run.
        bad_images: messages of the images skipped because they could not be decoded.
        report: every problem found (also in ``report.json``).
    """

    cache: Cache
    up_to_date: bool
    resumed_chunks: int
    bad_images: list[str]
    report: ValidationReport | None


def default_workers() -> int:
    """CPU cores usable by this process."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def prepare_cache(
    data_dir: str | Path,
    out: str | Path,
    size: int = DEFAULT_SIZE,
    workers: int | None = None,
    lenient: bool = False,
    val_fraction: float = 0.1,
    split_seed: int = 0,
    chunk_size: int = DEFAULT_CHUNK,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: bool = True,
) -> PrepareResult:
    """Build (or resume, or confirm) the cache of a ChestX-ray14 folder.

    Args:
        data_dir: the dataset folder (official or synthetic layout).
        out: the cache folder (created).
        size: side S of the cached (N, S, S) uint8 images.
        workers: decoding processes (default: all cores; 1 = in this process).
        lenient: proceed with what is usable instead of failing on any validation problem.
        val_fraction, split_seed: patient-level validation split of train_val (METHOD.md).
        chunk_size: images per task; the unit of resumption.
        max_pixels: refuse larger images (decompression-bomb guard).
        progress: show a tqdm bar.

    Raises:
        DatasetValidationError: strict mode and the folder has problems (the message lists them).
        DatasetError: the folder is unusable (no Data_Entry, no split list).
    """
    if size < 8:
        raise ValueError(f"size must be >= 8, got {size}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    workers = default_workers() if workers is None else max(1, int(workers))
    out = Path(out)
    dataset = read_dataset(data_dir, val_fraction=val_fraction, split_seed=split_seed)
    if not lenient:
        dataset.report.raise_if_problems()
    items = dataset.usable()
    if items.empty:
        raise ValueError(f"{data_dir}: no usable images (none found on disk with a split)\n{dataset.report.summary()}")
    source = _source(dataset, items, size, val_fraction, split_seed, max_pixels)

    existing = _finished_cache(out, source["fingerprint"])
    if existing is not None:
        log.info("%s is up to date (%d images); nothing to do", out, len(existing))
        return PrepareResult(existing, up_to_date=True, resumed_chunks=0, bad_images=[], report=None)
    out.mkdir(parents=True, exist_ok=True)
    (out / META_FILE).unlink(missing_ok=True)  # unfinished from here on
    for stale in remove_stale_temporaries(out):  # half-written by a killed run; never read
        log.info("removed %s, left by an interrupted run", stale)

    n = len(items)
    state = {"fingerprint": source["fingerprint"], "count": n, "size": size, "chunk_size": chunk_size, "max_pixels": max_pixels}
    done = _load_or_start(out, state)
    resumed = len(done)
    if resumed:
        log.info("resuming %s: %d of %d chunks already done", out, resumed, _num_chunks(n, chunk_size))
    if (out / PARTIAL_FILE).exists():
        done = _run_chunks(out, items["path"].tolist(), size, chunk_size, workers, max_pixels, done, progress)
        _write_images(out, done, n, size, chunk_size)
    # else: killed after images.npy was complete but before meta.json; only the small files remain to write

    sizes, bad = _collect(done, n, chunk_size)
    good = np.array([s is not None for s in sizes])
    bad_messages = [bad[i] for i in sorted(bad)]
    report = dataset.report
    for msg in bad_messages:
        report.add("bad_image", msg)
    index = items.loc[good, ["image_id", "patient_id", "split"]].reset_index(drop=True)
    wh = np.array([s for s in sizes if s is not None], dtype=np.int64).reshape(-1, 2)
    index["orig_width"], index["orig_height"] = wh[:, 0], wh[:, 1]
    labels = items.loc[good, list(FINDINGS)].reset_index(drop=True)
    index = pd.concat([index, labels], axis=1)
    boxes = dataset.boxes[dataset.boxes["image_id"].isin(set(index["image_id"]))].reset_index(drop=True)
    report.stats.update(
        cached_images=len(index),
        skipped_bad_images=len(bad_messages),
        **{f"cached_{s}": int((index["split"] == s).sum()) for s in ("train", "val", "test")},
        cached_boxes=len(boxes),
        size=size,
    )
    atomic_write_json(out / REPORT_FILE, report.to_dict())
    cache = finalize_cache(out, index, boxes, size=size, source=source)
    for name in (STATE_FILE, DONE_FILE):
        (out / name).unlink(missing_ok=True)
    log.info("wrote %s: %d images (%d bad skipped)", out, len(cache), len(bad_messages))
    return PrepareResult(cache, up_to_date=False, resumed_chunks=resumed, bad_images=bad_messages, report=report)


# --------------------------------------------------------------------------- source fingerprint


def _source(dataset: ChestXray14, items: pd.DataFrame, size: int, val_fraction: float, seed: int, max_pixels: int) -> dict[str, Any]:
    """meta.json ``source``: arguments, metadata files used, and a fingerprint of everything the output depends on."""
    h = hashlib.sha256()
    args = {"size": size, "val_fraction": val_fraction, "split_seed": seed, "max_pixels": max_pixels}
    h.update(json.dumps(args, sort_keys=True).encode())
    metadata = {}
    for name, path in sorted(dataset.files.metadata.items()):
        st = path.stat()
        metadata[name] = str(path)
        h.update(f"{name}\0{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    for image_id, split, path in items[["image_id", "split", "path"]].itertuples(index=False):
        st = os.stat(path)
        h.update(f"{image_id}\0{split}\0{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    labels_from = next((str(dataset.files.metadata[n]) for n in DATA_ENTRY_NAMES if n in dataset.files.metadata), None)
    return {
        "data_dir": str(Path(dataset.root).resolve()),
        **args,
        "labels_file": labels_from,
        "metadata_files": metadata,
        "images": len(items),
        "fingerprint": h.hexdigest(),
    }


def _finished_cache(out: Path, fingerprint: str) -> Cache | None:
    if not (out / META_FILE).exists():
        return None
    try:
        cache = Cache(out)
    except CacheError as e:
        log.warning("existing cache at %s is unusable (%s); rebuilding", out, e)
        return None
    if cache.meta.get("source", {}).get("fingerprint") != fingerprint:
        log.info("%s was built from another source or with other arguments; rebuilding", out)
        return None
    return cache


# --------------------------------------------------------------------------- resumable state


def _num_chunks(n: int, chunk_size: int) -> int:
    return (n + chunk_size - 1) // chunk_size


def _load_or_start(out: Path, state: dict[str, Any]) -> dict[int, dict]:
    """Chunks already done by an interrupted run with the same state, else a fresh partial array."""
    state_path, done_path, partial = out / STATE_FILE, out / DONE_FILE, out / PARTIAL_FILE
    try:
        previous = json.loads(state_path.read_text()) if state_path.exists() else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        previous = None
    if previous == state:
        done = _read_done(done_path)
        all_done = len(done) == _num_chunks(state["count"], state["chunk_size"])
        if partial.exists() or (all_done and _compacted(out, done, state["size"])):
            # rewrite without a torn last line, so later appends start on a fresh line
            atomic_write_text(done_path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in done.values()))
            return done
    for name in (PARTIAL_FILE, DONE_FILE, STATE_FILE, IMAGES_FILE):
        (out / name).unlink(missing_ok=True)
    _create_array_file(partial, (state["count"], state["size"], state["size"]))
    done_path.touch()
    atomic_write_json(state_path, state)
    return {}


def _read_done(path: Path) -> dict[int, dict]:
    done: dict[int, dict] = {}
    if not path.exists():
        return done
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
            done[int(record["chunk"])] = record
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue  # a line torn by a crash: that chunk is simply redone
    return done


def _run_chunks(
    out: Path,
    paths: list[str],
    size: int,
    chunk_size: int,
    workers: int,
    max_pixels: int,
    done: dict[int, dict],
    progress: bool,
) -> dict[int, dict]:
    n = len(paths)
    todo = [k for k in range(_num_chunks(n, chunk_size)) if k not in done]
    if not todo:
        return done
    partial = str(out / PARTIAL_FILE)
    done_items = sum(len(r["sizes"]) for r in done.values())
    tasks = ((partial, k, k * chunk_size, paths[k * chunk_size : (k + 1) * chunk_size], size, max_pixels) for k in todo)
    bar = tqdm(total=n, initial=done_items, unit="img", desc="prepare", disable=not progress, dynamic_ncols=True)
    finished = 0
    try:
        with open(out / DONE_FILE, "a", encoding="utf-8") as marker, bar:
            for record in _execute(tasks, workers):
                marker.write(json.dumps(record, sort_keys=True) + "\n")
                marker.flush()
                os.fsync(marker.fileno())
                done[record["chunk"]] = record
                bar.update(len(record["sizes"]))
                if record["bad"]:
                    bar.set_postfix(bad=sum(len(r["bad"]) for r in done.values()))
                finished += 1
                if _after_chunk_hook is not None:
                    _after_chunk_hook(finished)
    finally:
        close_partial(partial)
    return done


def _execute(tasks: Iterator[tuple], workers: int) -> Iterator[dict]:
    """Run ``process_chunk`` over tasks: in this process for 1 worker, else in a process pool."""
    if workers == 1:
        for task in tasks:
            yield process_chunk(*task)
        return
    # fork (as torch's DataLoader does on Linux): workers start at once, without re-importing the
    # caller's __main__ (spawn would, e.g. torch for a training script); spawn where fork is absent
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=worker_init, initargs=(os.getpid(),)) as pool:
        pending: set[Future] = set()
        try:
            for task in tasks:
                pending.add(pool.submit(process_chunk, *task))
                if len(pending) >= 2 * workers:
                    finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for f in finished:
                        yield f.result()
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in finished:
                    yield f.result()
        except BaseException:
            for f in pending:
                f.cancel()
            raise


def _collect(done: dict[int, dict], n: int, chunk_size: int) -> tuple[list[list[int] | None], dict[int, str]]:
    """Per item its original (w, h) or None (bad), and item -> message for the bad ones."""
    sizes: list[list[int] | None] = []
    bad: dict[int, str] = {}
    for k in range(_num_chunks(n, chunk_size)):
        record = done[k]
        sizes.extend(record["sizes"])
        for offset, msg in record["bad"].items():
            bad[k * chunk_size + int(offset)] = msg
    if len(sizes) != n:
        raise RuntimeError(f"internal error: {len(sizes)} sizes recorded for {n} images")
    return sizes, bad


def _compacted(out: Path, done: dict[int, dict], size: int) -> bool:
    """True when images.npy already holds the final (good rows only) array."""
    if not (out / IMAGES_FILE).exists():
        return False
    n_good = sum(s is not None for r in done.values() for s in r["sizes"])
    try:
        arr = np.load(out / IMAGES_FILE, mmap_mode="r")
    except (ValueError, OSError):
        return False
    return arr.shape == (n_good, size, size) and arr.dtype == np.uint8


def _write_images(out: Path, done: dict[int, dict], n: int, size: int, chunk_size: int) -> None:
    """images.npy.partial -> images.npy: a rename, or a copy without the bad rows (atomic either way)."""
    partial = out / PARTIAL_FILE
    sizes, _ = _collect(done, n, chunk_size)
    good = np.flatnonzero([s is not None for s in sizes])
    if len(good) == 0:
        raise ValueError(f"{out}: none of the {n} images could be decoded (see the messages above)")
    if len(good) == n:
        os.replace(partial, out / IMAGES_FILE)
        return
    src = np.load(partial, mmap_mode="r")
    tmp = out / f".{IMAGES_FILE}.compact.tmp"
    _create_array_file(tmp, (len(good), size, size))
    dst = np.load(tmp, mmap_mode="r+")
    block = 4096
    for start in range(0, len(good), block):
        dst[start : start + block] = src[good[start : start + block]]
    dst.flush()
    del dst, src
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, out / IMAGES_FILE)
    with contextlib.suppress(FileNotFoundError):
        partial.unlink()


def _create_array_file(path: Path, shape: tuple[int, int, int]) -> None:
    """A zero-filled (N, S, S) uint8 ``.npy`` file with its disk blocks reserved up front.

    A memmap of a sparse file gets its blocks only when a page is first written, and a
    full disk then kills the process with SIGBUS (no message). Reserving the blocks
    here (``posix_fallocate``) turns a full disk, a quota or a file-size limit into a
    clear OSError naming the file, before any image is decoded.
    """
    try:
        arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)
        arr.flush()
        del arr
        if hasattr(os, "posix_fallocate"):
            fd = os.open(path, os.O_RDWR)
            try:
                os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):  # no fallocate here: go on
                    raise
            finally:
                os.close(fd)
    except OSError as e:
        with contextlib.suppress(OSError):
            path.unlink()
        if e.errno in NO_SPACE_ERRNOS:
            raise no_space_error(e, path) from e
        raise
