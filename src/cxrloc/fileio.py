"""Atomic file writes: write to a temporary name in the same folder, fsync, then rename.

A reader (or a rerun after a crash) therefore sees either the previous complete
file or the new complete file, never a half-written one. A failed write (disk
full, file-size limit) removes the temporary file and leaves the old one intact.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

_UMASK = os.umask(0o022)
os.umask(_UMASK)

#: errno values that mean "no room for this file": disk full, file-size limit (``ulimit -f``), quota
NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT})


def no_space_error(e: OSError, path: str | Path) -> OSError:
    """``e`` (disk full, file-size limit, quota) as an OSError whose message names ``path``."""
    return OSError(e.errno, f"{e.strerror}: cannot write {path} (disk full, quota or file-size limit); "
                            "the previous version of the file, if any, is unchanged")


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on success fsync and rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        if e.errno in NO_SPACE_ERRNOS:
            raise no_space_error(e, path) from e
        raise
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the usual permissions
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno in NO_SPACE_ERRNOS:
            raise no_space_error(e, path) from e
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def atomic_write_with(path: str | Path, writer: Callable[[IO[bytes]], None]) -> None:
    """Call ``writer(fileobj)`` on a temporary file, then rename it to ``path``."""
    with atomic_open(path, "wb") as f:
        writer(f)


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the ``.NAME.XXXX.tmp`` files an atomic write leaves behind when its process is killed.

    Call only where this process is the folder's single writer (the start of a prepare
    or training run). Returns the paths removed.
    """
    removed = []
    for p in Path(folder).glob(".*.tmp"):
        with contextlib.suppress(FileNotFoundError, IsADirectoryError):
            p.unlink()
            removed.append(p)
    return removed


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _json_default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
