"""The per-process half of ``cxrloc prepare``: decode + resize a chunk of images into the partial cache.

Kept apart from :mod:`cxrloc.data.prepare` so that a spawned worker (where fork is absent) imports only
numpy and Pillow (fast start-up), not pandas.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

import numpy as np

from cxrloc.data.io import DEFAULT_MAX_PIXELS, ImageDecodeError, read_image_resized

_open_arrays: dict[str, tuple[int, np.ndarray]] = {}


def worker_init(parent_pid: int | None = None) -> None:
    """Pool initializer: leave Ctrl-C to the parent, and (Linux) die with the parent even on SIGKILL.

    Args:
        parent_pid: the pool owner's pid; if it is already gone (killed while this worker was
            starting), exit at once instead of waiting forever for tasks.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)


def open_partial(path: str) -> np.ndarray:
    """The partial (N, S, S) uint8 array opened read-write as a memmap, once per process."""
    inode = os.stat(path).st_ino  # a file recreated under the same name gets a fresh mapping
    cached = _open_arrays.get(path)
    if cached is None or cached[0] != inode:
        cached = (inode, np.load(path, mmap_mode="r+"))
        _open_arrays[path] = cached
    return cached[1]


def close_partial(path: str) -> None:
    """Drop this process's memmap of ``path`` (after the file is renamed or deleted)."""
    cached = _open_arrays.pop(path, None)
    if cached is not None:
        cached[1].flush()


def process_chunk(
    partial_path: str,
    chunk_id: int,
    start: int,
    paths: list[str],
    size: int,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> dict:
    """Decode and resize ``paths`` into rows ``start .. start+len(paths)-1`` of the partial array.

    A file that cannot be decoded leaves its row zero and is reported, not raised.
    The rows are flushed to disk before returning, so the caller may then mark the
    chunk done.

    Returns:
        ``{"chunk": id, "sizes": [[w, h] or None, ...], "bad": {offset: message}}``.
    """
    arr = open_partial(partial_path)
    sizes: list[list[int] | None] = []
    bad: dict[str, str] = {}
    for offset, path in enumerate(paths):
        try:
            image, (w, h) = read_image_resized(path, size, max_pixels=max_pixels)
        except ImageDecodeError as e:
            arr[start + offset] = 0
            sizes.append(None)
            bad[str(offset)] = str(e)
            continue
        except MemoryError:
            arr[start + offset] = 0
            sizes.append(None)
            bad[str(offset)] = f"{path}: out of memory while decoding"
            continue
        arr[start + offset] = image
        sizes.append([int(w), int(h)])
    arr.flush()
    return {"chunk": chunk_id, "sizes": sizes, "bad": bad}
