"""Helpers of the fault-injection suite: tiny datasets, byte-level damage, subprocess runs, file snapshots.

Everything here is small on purpose (a few dozen 64 px images, the ``densenet-tiny``
backbone at 32 px input) so the whole suite runs in a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import resource
import signal
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
CHILD = HERE / "fault_child.py"

#: config overrides that make training take a second or two per epoch on one CPU thread
FAST_TRAIN = (
    "model.backbone=densenet-tiny",
    "model.pretrained=false",
    "model.output_stride=16",
    "data.image_size=32",
    "data.num_workers=0",
    "train.batch_size=4",
    "train.max_epochs=2",
    "train.accelerator=cpu",
    "train.devices=1",
    "train.log_every_n_steps=1",
    "mining.num_positive_candidates=10",
    "mining.num_negative_candidates=10",
)
#: images in the synthetic dataset, their side, and the prepare arguments every test uses
SYNTH_IMAGES, SYNTH_SIZE = 40, 64
PREPARE_KW: dict[str, Any] = {"size": 64, "workers": 1, "chunk_size": 4, "progress": False}
#: files of a finished cache; compared byte for byte (meta.json without its creation time)
CACHE_FILES = ("images.npy", "index.csv", "boxes.csv", "report.json")


# --------------------------------------------------------------------------- processes


def child_env() -> dict[str, str]:
    """Environment of a child process: one math thread, offline, the repo's package importable."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", CXRLOC_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.pop("PYTEST_CURRENT_TEST", None)
    return env


def run_child(args: list[str], log: Path, timeout: float = 300, preexec: Callable[[], None] | None = None,
              ) -> subprocess.CompletedProcess:
    """Run ``python fault_child.py ARGS`` with output to ``log`` (a file: nothing holds a pipe open after a kill)."""
    with open(log, "w") as f:
        return subprocess.run([sys.executable, str(CHILD), *args], stdout=f, stderr=subprocess.STDOUT,
                              env=child_env(), timeout=timeout, preexec_fn=preexec, cwd=HERE)


def run_cli(args: list[str], timeout: float = 300, preexec: Callable[[], None] | None = None,
            ) -> subprocess.CompletedProcess:
    """Run ``python -m cxrloc.cli ARGS`` in a child process; ``.stdout`` holds stdout and stderr.

    Output goes through a pipe, which a file-size limit (``preexec``) does not apply to.
    """
    return subprocess.run([sys.executable, "-m", "cxrloc.cli", *args], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, env=child_env(), timeout=timeout, preexec_fn=preexec)


def file_size_limit(limit: int) -> Callable[[], None]:
    """A ``preexec_fn``: ``ulimit -f`` of ``limit`` bytes with SIGXFSZ ignored, so writes fail with EFBIG."""

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    return apply


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the body with ``n`` intra-op threads (the kill tests compare against one-thread child runs)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------- disk full, in process


class _NoSpaceWriter:
    """File proxy that raises ENOSPC once ``budget`` bytes have been written (the rest delegates)."""

    def __init__(self, f: Any, budget: int) -> None:
        self._f, self._budget = f, budget

    def write(self, data: Any) -> int:
        n = len(data)
        if n > self._budget:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._budget -= n
        return self._f.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)

    def __enter__(self) -> _NoSpaceWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._f.close()

    def __iter__(self) -> Iterator[Any]:
        return iter(self._f)


def fill_disk_when_writing(monkeypatch: Any, file_name: str, budget: int = 0) -> list[str]:
    """Make every atomic write of ``file_name`` fail with ENOSPC after ``budget`` bytes.

    Patches ``os.fdopen`` (which :func:`cxrloc.fileio.atomic_open` uses on its temporary
    ``.NAME.XXXX.tmp`` file), so the real cleanup and error paths run. Returns the list
    of temporary paths that were failed, for assertions.
    """
    real = os.fdopen
    failed: list[str] = []

    def fdopen(fd: int, *args: Any, **kwargs: Any) -> Any:
        f = real(fd, *args, **kwargs)
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return f
        if Path(target).name.startswith(f".{file_name}.") and target.endswith(".tmp"):
            failed.append(target)
            return _NoSpaceWriter(f, budget)
        return f

    monkeypatch.setattr(os, "fdopen", fdopen)
    return failed


# --------------------------------------------------------------------------- files


def flip_bit(path: Path, position: int, bit: int = 0) -> None:
    """Flip one bit of a file in place."""
    data = bytearray(path.read_bytes())
    data[position] ^= 1 << bit
    path.write_bytes(bytes(data))


def truncate(path: Path, keep: int) -> None:
    """Keep only the first ``keep`` bytes of a file."""
    path.write_bytes(path.read_bytes()[:keep])


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree_state(root: Path, skip: tuple[Path, ...] = ()) -> dict[str, tuple[int, str]]:
    """{relative path: (size, sha256)} of every file below ``root`` except the ``skip`` folders."""
    skip = tuple(p.resolve() for p in skip)
    out = {}
    for p in sorted(root.rglob("*")):
        rp = p.resolve()
        if any(rp == s or s in rp.parents for s in skip) or not p.is_file():
            continue
        out[str(p.relative_to(root))] = (p.stat().st_size, sha256(p))
    return out


def cache_bytes(root: Path) -> dict[str, Any]:
    """What must be identical between two caches built from the same source: the files and meta.json."""
    meta = json.loads((root / "meta.json").read_text())
    meta.pop("created", None)
    return {"files": {n: (root / n).read_bytes() for n in CACHE_FILES}, "meta": meta,
            "listing": sorted(p.name for p in root.iterdir())}


# --------------------------------------------------------------------------- image files


def png_bytes(array: np.ndarray) -> bytes:
    """PNG bytes of a uint8 (L) or uint16 (I;16) array, written by Pillow."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims ``width x height`` 8-bit gray pixels and carries a few bytes of data (no allocation)."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def dicom_bytes(array: np.ndarray | None, transfer_syntax: str | None = None, **attrs: Any) -> bytes:
    """A small DICOM file (MONOCHROME2) of a uint16 array; ``array=None`` gives one without pixel data."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # digital X-ray
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["cxrloc-faults"])
    meta.TransferSyntaxUID = transfer_syntax or ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.PatientID = "0"
    rows, cols = (64, 64) if array is None else array.shape
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    for k, v in attrs.items():
        setattr(ds, k, v)
    if array is not None:
        raw = np.ascontiguousarray(array, dtype="<u2").tobytes()
        if meta.TransferSyntaxUID != ExplicitVRLittleEndian:  # a compressed syntax: encapsulated (undecodable) bytes
            from pydicom.encaps import encapsulate

            raw = encapsulate([raw])
        ds.PixelData = raw
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
