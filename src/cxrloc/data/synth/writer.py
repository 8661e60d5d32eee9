"""Files of a ChestX-ray14-layout dataset folder: PNG bytes, CSV texts and split lists.

Formats copy the official NIH files (checked in the tests against the real ones):

* ``Data_Entry_2017.csv``: the v2020 header
  ``Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,
  OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]`` (11 fields per row), labels
  joined by ``|`` in alphabetical order, ``\\n`` line ends.
* ``BBox_List_2017.csv``: header ``Image Index,Finding Label,Bbox [x,y,w,h],,,`` (three empty
  trailing header fields), Infiltration spelled ``Infiltrate``.
* ``train_val_list.txt`` / ``test_list.txt``: one name per line (17 bytes per name with the
  newline), no trailing newline.
* ``synth_truth_boxes.csv`` (ours): ``Image Index,Finding Label,x,y,w,h``, the true box of every
  planted finding (canonical names).
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from cxrloc.data.synth.cohort import ImageJob

DATA_ENTRY_NAME = "Data_Entry_2017.csv"
BBOX_NAME = "BBox_List_2017.csv"
TRUTH_NAME = "synth_truth_boxes.csv"
META_NAME = "synth_meta.json"
TRAIN_VAL_NAME = "train_val_list.txt"
TEST_NAME = "test_list.txt"
IMAGES_DIR = "images"

DATA_ENTRY_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"
)
BBOX_HEADER = "Image Index,Finding Label,Bbox [x,y,w,h],,,"
TRUTH_HEADER = "Image Index,Finding Label,x,y,w,h"
#: BBox_List spells Infiltration this way.
BBOX_SPELLING = {"Infiltration": "Infiltrate"}
#: Field of view of a synthetic film (mm); pixel spacing = FIELD_MM / size.
FIELD_MM = 360.0


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def encode_png_gray(image: np.ndarray, level: int = 1) -> bytes:
    """Encode an (H, W) uint8 array as an 8-bit greyscale PNG (``L``), deterministic bytes.

    Every row uses the PNG "Up" filter (vectorised), then Huffman-only deflate: about 3x
    faster than Pillow's encoder for these noisy images, at a similar file size.
    """
    if image.dtype != np.uint8 or image.ndim != 2:
        raise ValueError(f"expected a 2-D uint8 image, got {image.dtype} {image.shape}")
    h, w = image.shape
    raw = np.empty((h, w + 1), dtype=np.uint8)
    raw[:, 0] = 2  # filter type Up
    raw[0, 1:] = image[0]
    np.subtract(image[1:], image[:-1], out=raw[1:, 1:])
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    packer = zlib.compressobj(level, zlib.DEFLATED, 15, 9, zlib.Z_HUFFMAN_ONLY)
    idat = packer.compress(raw.tobytes()) + packer.flush()
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def write_file_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary name and rename (no fsync: thousands of images; a rerun rewrites)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def data_entry_text(jobs: Iterable[ImageJob], size: int) -> str:
    """The Data_Entry CSV for the jobs (rows in name order)."""
    spacing = f"{FIELD_MM / size:.6g}"
    lines = [DATA_ENTRY_HEADER]
    for j in sorted(jobs, key=lambda j: j.name):
        labels = "|".join(sorted(j.kinds)) if j.kinds else "No Finding"
        lines.append(f"{j.name},{labels},{j.follow_up},{j.patient},{j.age},{j.sex},{j.view},{size},{size},{spacing},{spacing}")
    return "\n".join(lines) + "\n"


def box_rows_text(header: str, rows: Iterable[tuple[str, str, tuple[int, int, int, int]]], official: bool) -> str:
    """BBox_List (``official=True``: Infiltrate spelling, float formatting) or truth-box CSV text."""
    lines = [header]
    for name, kind, (x, y, w, h) in rows:
        if official:
            lines.append(f"{name},{BBOX_SPELLING.get(kind, kind)},{float(x)},{float(y)},{float(w)},{float(h)}")
        else:
            lines.append(f"{name},{kind},{x},{y},{w},{h}")
    return "\n".join(lines) + "\n"


def name_list_text(names: Iterable[str]) -> str:
    """A split list: sorted names, newline-separated, no trailing newline (as NIH ships them)."""
    return "\n".join(sorted(names))
