"""The image decoder never hangs nor crashes the process: it returns a (H, W) uint8 array or raises ImageDecodeError.

* Property tests (hypothesis, derandomised so CI sees the same examples every run):
  arbitrary bytes under every image extension, valid PNGs with mutated bytes and forged
  IHDR sizes, DICOM headers with hostile values.
* A bounded fuzz run in a child process: seeded mutations (bit flips, overwritten runs,
  truncation, forged IHDR, inserted bytes) of a real ChestX-ray14 PNG from the sample
  folder and of a small DICOM built with pydicom. The parent gives every input a time
  budget and fails on a hang, a crash (signal or non-zero exit), an exception other than
  ImageDecodeError, a message that does not name the file, or a result that is not uint8 (H, W).
"""

from __future__ import annotations

import functools
import io
import os
import resource
import selectors
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from fault_tools import CHILD, child_env, dicom_bytes, png_bytes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cxrloc.data.io import ImageDecodeError, read_image, read_image_resized

PROPERTY = settings(max_examples=120, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])
PER_INPUT_SECONDS = 20.0  # generous for a loaded CI machine; a clean decode takes milliseconds
MEMORY_LIMIT = 3 << 30  # address space of the fuzz child: a runaway allocation becomes MemoryError (a finding)


def _decode_bytes(data: bytes, suffix: str) -> np.ndarray | None:
    """read_image on ``data``; None when refused with ImageDecodeError (naming the file). Anything else raises."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"input{suffix}"
        path.write_bytes(data)
        try:
            image = read_image(path)
        except ImageDecodeError as e:
            assert str(path) in str(e)
            return None
        assert isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 2 and image.size > 0
        small, size = read_image_resized(path, 16)
        assert small.shape == (16, 16) and small.dtype == np.uint8 and size == (image.shape[1], image.shape[0])
        return image


# --------------------------------------------------------------------------- properties


@pytest.mark.timeout(300)
@PROPERTY
@given(data=st.binary(max_size=4096), suffix=st.sampled_from([".png", ".jpg", ".dcm", ".tif", ".bmp", ""]))
def test_arbitrary_bytes(data, suffix):
    _decode_bytes(data, suffix)


@pytest.mark.timeout(300)
@PROPERTY
@given(
    image=st.tuples(st.integers(1, 40), st.integers(1, 40), st.sampled_from(["uint8", "uint16"]), st.integers(0, 2**16)),
    edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=6),
    cut=st.one_of(st.none(), st.integers(0, 10**6)),
)
def test_mutated_png(image, edits, cut):
    h, w, dtype, seed = image
    array = np.random.default_rng(seed).integers(0, 256 if dtype == "uint8" else 65536, (h, w)).astype(dtype)
    data = bytearray(png_bytes(array))
    for pos, value in edits:
        data[pos % len(data)] = value
    if cut is not None:
        data = data[: cut % (len(data) + 1)]
    _decode_bytes(bytes(data), ".png")


@pytest.mark.timeout(300)
@PROPERTY
@given(width=st.integers(0, 2**31 - 1), height=st.integers(0, 2**31 - 1), depth=st.sampled_from([1, 2, 4, 8, 16]),
       colour=st.sampled_from([0, 2, 3, 4, 6]), payload=st.binary(max_size=256))
def test_forged_png_header(width, height, depth, colour, payload):
    """IHDR sizes up to 2^31-1 with a valid CRC and a tiny IDAT: refused or failed quickly, never allocated."""

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(payload)) + chunk(b"IEND", b"")
    start = time.monotonic()
    image = _decode_bytes(data, ".png")
    assert time.monotonic() - start < 10
    if image is not None:
        assert image.shape == (height, width)


_NUMBERS = st.one_of(st.integers(-(2**31), 2**31), st.floats(allow_nan=True, allow_infinity=True),
                     st.text(max_size=8))


@pytest.mark.timeout(300)
@PROPERTY
@given(
    rows=st.integers(0, 70000), cols=st.integers(0, 70000),
    bits=st.sampled_from([1, 8, 12, 16, 32, 64]), stored=st.integers(0, 40), signed=st.sampled_from([0, 1, 2]),
    photometric=st.sampled_from(["MONOCHROME1", "MONOCHROME2", "RGB", "YBR_FULL", "PALETTE COLOR", "nonsense"]),
    samples=st.sampled_from([1, 3, 4]), frames=st.one_of(st.none(), st.integers(-2, 5)),
    window=st.tuples(_NUMBERS, _NUMBERS), rescale=st.tuples(_NUMBERS, _NUMBERS),
    function=st.sampled_from([None, "LINEAR", "LINEAR_EXACT", "SIGMOID", "BOGUS"]),
    pixels=st.integers(0, 20000),
)
def test_hostile_dicom_header(rows, cols, bits, stored, signed, photometric, samples, frames, window, rescale,
                              function, pixels):
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(_base_dicom()), force=True)
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit = rows, cols, bits, stored, max(stored - 1, 0)
    ds.PixelRepresentation, ds.PhotometricInterpretation, ds.SamplesPerPixel = signed, photometric, samples
    if frames is not None:
        ds.NumberOfFrames = frames
    for (name, value) in (("WindowCenter", window[0]), ("WindowWidth", window[1]),
                          ("RescaleSlope", rescale[0]), ("RescaleIntercept", rescale[1])):
        try:
            setattr(ds, name, value)
        except (ValueError, TypeError, OverflowError):
            pass  # pydicom refused to store it: not an input a file can carry
    if function is not None:
        ds.VOILUTFunction = function
    ds.PixelData = bytes(np.random.default_rng(pixels).integers(0, 256, pixels, dtype=np.uint8))
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "hostile.dcm"
        try:
            ds.save_as(path, enforce_file_format=False)
        except Exception:  # noqa: BLE001 - pydicom cannot even write it: nothing to read
            return
        _decode_bytes(path.read_bytes(), ".dcm")


@functools.cache
def _base_dicom() -> bytes:
    """A valid 64 x 64 16-bit DICOM, built once (in memory: nothing left behind in /tmp)."""
    return dicom_bytes(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) % 4096)


# --------------------------------------------------------------------------- bounded fuzz run


def _mutants(seed_bytes: bytes, n: int, rng: np.random.Generator, png: bool) -> list[bytes]:
    """``n`` seeded mutations of ``seed_bytes``: flips, overwritten runs, truncation, inserts, forged IHDR."""
    out = []
    for k in range(n):
        data = bytearray(seed_bytes)
        kind = k % 5
        if kind == 0:  # 1-8 bit flips
            for pos in rng.integers(0, len(data), int(rng.integers(1, 9))):
                data[pos] ^= 1 << int(rng.integers(8))
        elif kind == 1:  # a run of random bytes
            start, length = int(rng.integers(0, len(data))), int(rng.integers(1, 64))
            data[start : start + length] = rng.integers(0, 256, length, dtype=np.uint8).tobytes()
        elif kind == 2:  # truncation
            data = data[: int(rng.integers(0, len(data)))]
        elif kind == 3:  # inserted bytes
            pos = int(rng.integers(0, len(data)))
            data[pos:pos] = rng.integers(0, 256, int(rng.integers(1, 32)), dtype=np.uint8).tobytes()
        elif png:  # forged IHDR size with a valid CRC
            w, h = (int(v) for v in rng.integers(0, 2**31, 2))
            if k % 2:
                w, h = int(rng.integers(1, 9000)), int(rng.integers(1, 9000))
            data[16:24] = struct.pack(">II", w, h)
            data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
        else:  # DICOM: a random 4-byte field overwritten (lengths, tags, values)
            pos = int(rng.integers(128, len(data) - 4))
            data[pos : pos + 4] = rng.integers(0, 256, 4, dtype=np.uint8).tobytes()
        out.append(bytes(data))
    return out


def _run_fuzz_child(files: list[Path]) -> dict[str, list[str]]:
    """Decode ``files`` in a child; per input at most PER_INPUT_SECONDS. Returns lines by status."""

    def limit_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))

    proc = subprocess.Popen([sys.executable, str(CHILD), "decode", *map(str, files)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, env=child_env(), preexec_fn=limit_memory)
    lines: dict[str, list[str]] = {"OK": [], "ERR": [], "BAD": []}
    current = None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    buffer = b""
    try:
        while True:
            if not sel.select(timeout=PER_INPUT_SECONDS):
                proc.kill()
                where = files[int(current)] if current is not None else "start-up"
                raise AssertionError(f"decoder hung for more than {PER_INPUT_SECONDS} s on {where}")
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            buffer += chunk
            *complete, buffer = buffer.split(b"\n")
            for raw in complete:
                status, index, *rest = raw.decode().split(" ", 2)
                if status == "START":
                    current = index
                else:
                    lines[status].append(f"{files[int(index)].name}: {' '.join(rest)}")
    finally:
        sel.close()
        rc = proc.wait(timeout=60)
    last = files[int(current)] if current is not None else None
    assert rc == 0, f"decoder process died (exit {rc}) while reading {last}"
    assert current is not None and int(current) == len(files) - 1, "the child stopped before the last input"
    return lines


@pytest.mark.timeout(600)
def test_bounded_fuzz_of_real_png_and_dicom(sample_dir, tmp_path):
    rng = np.random.default_rng(20240601)
    real_png = sorted((sample_dir / "images").glob("*.png"))[0].read_bytes()
    dicom = dicom_bytes((np.random.default_rng(1).integers(0, 4096, (48, 40))).astype(np.uint16),
                        WindowCenter=2048, WindowWidth=4096, RescaleSlope=1, RescaleIntercept=0)
    inputs = [(m, ".png") for m in _mutants(real_png, 150, rng, png=True)]
    inputs += [(m, ".dcm") for m in _mutants(dicom, 120, rng, png=False)]
    inputs += [(m, "") for m in _mutants(dicom, 30, rng, png=False)]  # no extension: found by the DICM preamble
    files = []
    for k, (data, suffix) in enumerate(inputs):
        path = tmp_path / f"mutant_{k:03d}{suffix}"
        path.write_bytes(data)
        files.append(path)
    lines = _run_fuzz_child(files)
    assert not lines["BAD"], "decoder misbehaved:\n" + "\n".join(lines["BAD"][:20])
    assert len(lines["OK"]) + len(lines["ERR"]) == len(files)
    assert len(lines["OK"]) >= 20 and len(lines["ERR"]) >= 20  # both outcomes were exercised
