"""Build tiny ChestX-ray14-layout folders in tmp for the data-layer tests (no real data needed)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
from PIL import Image

DATA_ENTRY_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"
)
BBOX_HEADER = "Image Index,Finding Label,Bbox [x,y,w,h],,,"

#: (name, labels, patient, official split)
DEFAULT_ROWS: list[tuple[str, str, int, str]] = [
    ("00000001_000.png", "Cardiomegaly", 1, "train_val"),
    ("00000001_001.png", "Cardiomegaly|Emphysema", 1, "train_val"),
    ("00000002_000.png", "No Finding", 2, "train_val"),
    ("00000003_000.png", "Hernia", 3, "train_val"),
    ("00000004_000.png", "Mass|Nodule", 4, "train_val"),
    ("00000005_000.png", "No Finding", 5, "train_val"),
    ("00000006_000.png", "Effusion", 6, "train_val"),
    ("00000007_000.png", "Infiltration", 7, "train_val"),
    ("00000008_000.png", "Atelectasis|Effusion", 8, "test"),
    ("00000008_001.png", "Infiltration|Pneumonia", 8, "test"),
    ("00000009_000.png", "No Finding", 9, "test"),
    ("00000010_000.png", "Pneumothorax", 10, "test"),
]
DEFAULT_BOXES = [
    ("00000008_000.png", "Atelectasis", 10.5, 12.0, 20.25, 8.0),
    ("00000008_001.png", "Infiltrate", 30.0, 4.0, 16.0, 40.0),
    ("00000008_001.png", "Pneumonia", 1.0, 2.0, 3.0, 4.0),
]


def image_pixels(i: int, size: int = 48) -> np.ndarray:
    """A deterministic, non-trivial (size, size) uint8 image for row i."""
    y, x = np.mgrid[0:size, 0:size]
    return ((x * (i + 3) + y * 5 + (x * y) % (7 + i)) % 256).astype(np.uint8)


def make_dataset(
    root: Path,
    rows: list[tuple[str, str, int, str]] | None = None,
    boxes: list[tuple] | None = None,
    image_size: int = 48,
    nested: bool = True,
    gz: bool = False,
    data_entry_name: str = "Data_Entry_2017.csv",
    extra_entry_lines: list[str] | None = None,
    skip_images: tuple[str, ...] = (),
    write_bbox: bool = True,
) -> Path:
    """Write a ChestX-ray14-layout folder: Data_Entry, BBox_List, split lists and PNGs.

    Images go into ``images_001/images`` (nested, like the official download) or ``images``.
    """
    rows = DEFAULT_ROWS if rows is None else rows
    boxes = DEFAULT_BOXES if boxes is None else boxes
    root.mkdir(parents=True, exist_ok=True)
    lines = [DATA_ENTRY_HEADER]
    for k, (name, labels, patient, _) in enumerate(rows):
        lines.append(f"{name},{labels},{k},{patient},50,M,PA,2500,2048,0.143,0.143")
    lines += extra_entry_lines or []
    text = "\n".join(lines) + "\n"
    if gz:
        with gzip.open(root / f"{data_entry_name}.gz", "wt") as f:
            f.write(text)
    else:
        (root / data_entry_name).write_text(text)
    (root / "train_val_list.txt").write_text("\n".join(n for n, _, _, s in rows if s == "train_val"))
    (root / "test_list.txt").write_text("\n".join(n for n, _, _, s in rows if s == "test"))
    if write_bbox:
        box_lines = [BBOX_HEADER] + [f"{n},{f},{x},{y},{w},{h}" for n, f, x, y, w, h in boxes]
        (root / "BBox_List_2017.csv").write_text("\n".join(box_lines) + "\n")
    folder = root / "images_001" / "images" if nested else root / "images"
    folder.mkdir(parents=True, exist_ok=True)
    for i, (name, *_rest) in enumerate(rows):
        if name not in skip_images:
            Image.fromarray(image_pixels(i, image_size)).save(folder / name)
    return folder
