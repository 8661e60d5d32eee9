"""Read a ChestX-ray14 dataset folder (official NIH download or the synthetic generator's copy of its layout).

Expected layout (files may sit anywhere below the folder; the shallowest copy wins)::

    D/Data_Entry_2017.csv | Data_Entry_2017_v2020.csv   (plain or .gz)
    D/BBox_List_2017.csv                                (plain or .gz)
    D/train_val_list.txt, D/test_list.txt               (plain or .gz)
    D/**/*.png                                          (official: images_0NN/images/*.png)

:func:`read_dataset` parses all of it, validates it (every problem goes into a
:class:`~cxrloc.data.report.ValidationReport` naming the file and row) and
assigns the splits of METHOD.md: the official test list is ``test``; 10% of the
train_val *patients* (seeded) are ``val``; the rest is ``train``. The split is
computed over every Data_Entry row, so it does not depend on which images are
on disk. Images that cannot be used (absent, bad row, no split) get split ``""``.
"""

from __future__ import annotations

import csv
import gzip
import io
import logging
import os
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cxrloc.data.cache import BOX_COLUMNS, SPLITS
from cxrloc.data.io import IMAGE_EXTENSIONS
from cxrloc.data.report import DatasetValidationError, ValidationReport
from cxrloc.labels import FINDINGS, NUM_FINDINGS, UnknownLabelError, canonical, encode

log = logging.getLogger(__name__)

#: Accepted Data_Entry names, in order of preference (v2020 is NIH's revised label file).
DATA_ENTRY_NAMES = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv")
BBOX_NAME = "BBox_List_2017.csv"
TRAIN_VAL_NAME = "train_val_list.txt"
TEST_NAME = "test_list.txt"
_META_NAMES = {n.lower(): n for n in (*DATA_ENTRY_NAMES, BBOX_NAME, TRAIN_VAL_NAME, TEST_NAME)}
_META_NAMES.update({f"{k}.gz": n for k, n in list(_META_NAMES.items())})
_REQUIRED_ENTRY_COLUMNS = ("Image Index", "Finding Labels", "Patient ID")


class DatasetError(ValueError):
    """The dataset folder cannot be used at all (no Data_Entry, no split list, bad header)."""


@dataclass
class DatasetFiles:
    """What a scan of the dataset folder found.

    Attributes:
        root: the dataset folder.
        metadata: canonical file name (e.g. ``"BBox_List_2017.csv"``) -> path of the copy used.
        images: file name -> every path with that name, preferred first (shallowest, then path order).
    """

    root: Path
    metadata: dict[str, Path] = field(default_factory=dict)
    images: dict[str, list[Path]] = field(default_factory=dict)


@dataclass
class ChestXray14:
    """A parsed, validated dataset folder.

    Attributes:
        root: the dataset folder.
        entries: one row per usable Data_Entry row, in file order: ``image_id``, ``patient_id``,
            ``official_split`` (``train_val``/``test``/``""``), ``split`` (``train``/``val``/``test``/``""``),
            ``path`` (image file, ``""`` when absent), ``line`` (CSV line number), then the 14 finding
            columns (0/1 uint8, FINDINGS order; No Finding = all zeros).
        boxes: BOX_COLUMNS rows (canonical finding names, original pixel coordinates).
        report: every problem found.
        files: metadata files used and the image files found.
    """

    root: Path
    entries: pd.DataFrame
    boxes: pd.DataFrame
    report: ValidationReport
    files: DatasetFiles

    @property
    def labels(self) -> np.ndarray:
        """(N, 14) uint8 multi-hot labels of :attr:`entries`."""
        return self.entries[list(FINDINGS)].to_numpy(dtype=np.uint8)

    def usable(self) -> pd.DataFrame:
        """Entries that have an image file and a split (what ``prepare`` caches), in file order."""
        keep = (self.entries["path"] != "") & (self.entries["split"] != "")
        return self.entries.loc[keep].reset_index(drop=True)


# --------------------------------------------------------------------------- scanning


def scan_dataset(root: str | Path) -> DatasetFiles:
    """Walk ``root`` once: find the metadata files and every image file (hidden folders are skipped)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset folder does not exist")
    found = DatasetFiles(root=root)
    meta_candidates: dict[str, list[tuple[int, str, Path]]] = defaultdict(list)
    images: dict[str, list[tuple[int, str, Path]]] = defaultdict(list)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = os.path.relpath(dirpath, root)
        depth = 0 if rel == "." else rel.count(os.sep) + 1
        for name in filenames:
            if name.startswith("."):
                continue
            lower = name.lower()
            path = Path(dirpath, name)
            if lower in _META_NAMES:
                meta_candidates[lower].append((depth, str(path), path))
            elif lower.endswith(IMAGE_EXTENSIONS):
                images[name].append((depth, str(path), path))
    for canonical_name in (*DATA_ENTRY_NAMES, BBOX_NAME, TRAIN_VAL_NAME, TEST_NAME):
        cands = meta_candidates.get(canonical_name.lower(), []) + meta_candidates.get(f"{canonical_name.lower()}.gz", [])
        if cands:
            found.metadata[canonical_name] = min(cands)[2]
    found.images = {name: [p for _, _, p in sorted(c)] for name, c in sorted(images.items())}
    return found


def _open_text(path: Path) -> io.TextIOBase:
    if path.name.lower().endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")  # noqa: SIM115 - caller closes


def _csv_rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) for each non-empty row; line 1 is the header."""
    try:
        with _open_text(path) as f:
            for i, row in enumerate(csv.reader(f), start=1):
                if row and any(cell.strip() for cell in row):
                    yield i, row
    except (OSError, UnicodeDecodeError, csv.Error, EOFError) as e:
        raise DatasetError(f"{path}: cannot be read ({type(e).__name__}: {e})") from e


def read_name_list(path: Path, report: ValidationReport) -> list[str]:
    """Names of a split list, one per line, in order; duplicates reported and dropped."""
    names: list[str] = []
    first_line: dict[str, int] = {}
    try:
        with _open_text(path) as f:
            for i, line in enumerate(f, start=1):
                name = line.strip()
                if not name:
                    continue
                if "," in name or " " in name:
                    report.add("malformed_row", f"{path.name}:{i}: {name!r} is not a single image name")
                    continue
                if name in first_line:
                    report.add("duplicate_name", f"{path.name}:{i}: {name} already listed on line {first_line[name]}")
                    continue
                first_line[name] = i
                names.append(name)
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise DatasetError(f"{path}: cannot be read ({type(e).__name__}: {e})") from e
    return names


# --------------------------------------------------------------------------- Data_Entry and BBox_List


def read_data_entry(path: Path, report: ValidationReport) -> tuple[pd.DataFrame, set[str]]:
    """Parse Data_Entry: usable rows (image_id, patient_id, line, 14 finding columns) and every name seen.

    Rows with too few fields, an empty name, a non-integer patient id, an empty or
    unknown label, or a duplicate name (the first row is kept) are reported and dropped.
    """
    rows = _csv_rows(path)
    try:
        _, header = next(rows)
    except StopIteration:
        raise DatasetError(f"{path}: empty file (expected a header with {', '.join(_REQUIRED_ENTRY_COLUMNS)})") from None
    columns = {h.strip().lower(): j for j, h in enumerate(header)}
    missing = [c for c in _REQUIRED_ENTRY_COLUMNS if c.lower() not in columns]
    if missing:
        raise DatasetError(f"{path}: header lacks column(s) {missing} (header: {header})")
    j_name, j_labels, j_patient = (columns[c.lower()] for c in _REQUIRED_ENTRY_COLUMNS)
    need = max(j_name, j_labels, j_patient) + 1
    label_cache: dict[str, np.ndarray | str] = {}
    names, patients, lines, vectors = [], [], [], []
    first_line: dict[str, int] = {}
    seen: set[str] = set()
    for line, row in rows:
        where = f"{path.name}:{line}"
        if len(row) < need:
            report.add("malformed_row", f"{where}: {len(row)} field(s), expected at least {need} ({','.join(row)[:80]!r})")
            continue
        name = row[j_name].strip()
        if not name:
            report.add("malformed_row", f"{where}: empty Image Index")
            continue
        seen.add(name)
        try:
            patient = int(row[j_patient].strip())
        except ValueError:
            report.add("malformed_row", f"{where}: {name}: Patient ID {row[j_patient]!r} is not an integer")
            continue
        text = row[j_labels].strip()
        if not text:
            report.add("malformed_row", f"{where}: {name}: empty Finding Labels")
            continue
        vec = label_cache.get(text)
        if vec is None:
            try:
                vec = encode(text)
            except UnknownLabelError as e:
                vec = str(e)
            label_cache[text] = vec
        if isinstance(vec, str):
            report.add("unknown_label", f"{where}: {name}: {vec}")
            continue
        if name in first_line:
            report.add("duplicate_name", f"{where}: {name} already listed on line {first_line[name]} (first row kept)")
            continue
        first_line[name] = line
        names.append(name)
        patients.append(patient)
        lines.append(line)
        vectors.append(vec)
    multi = np.stack(vectors) if vectors else np.zeros((0, NUM_FINDINGS), np.uint8)
    entries = pd.DataFrame({"image_id": names, "patient_id": np.asarray(patients, dtype=np.int64), "line": lines})
    for j, finding in enumerate(FINDINGS):
        entries[finding] = multi[:, j]
    return entries, seen


def read_bbox_list(path: Path, known_images: set[str], report: ValidationReport) -> pd.DataFrame:
    """Parse BBox_List (positional columns: name, finding, x, y, w, h; trailing empty header columns ok).

    Findings are canonical (``Infiltrate`` -> ``Infiltration``); coordinates are original pixels.
    """
    out: dict[str, list] = {c: [] for c in BOX_COLUMNS}
    rows = _csv_rows(path)
    next(rows, None)  # header: "Image Index,Finding Label,Bbox [x,y,w,h],,,"
    for line, row in rows:
        where = f"{path.name}:{line}"
        if len(row) < 6:
            report.add("malformed_row", f"{where}: {len(row)} field(s), expected 6 (name, finding, x, y, w, h)")
            continue
        name, label = row[0].strip(), row[1].strip()
        try:
            x, y, w, h = (float(v) for v in row[2:6])
        except ValueError:
            report.add("malformed_row", f"{where}: {name}: box values {row[2:6]} are not numbers")
            continue
        if not all(np.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
            report.add("malformed_row", f"{where}: {name}: invalid box x={x}, y={y}, w={w}, h={h}")
            continue
        try:
            finding = canonical(label)
        except UnknownLabelError as e:
            report.add("unknown_label", f"{where}: {name}: {e}")
            continue
        if name not in known_images:
            report.add("box_unknown_image", f"{where}: {name} is not in Data_Entry")
            continue
        for col, val in zip(BOX_COLUMNS, (name, finding, x, y, w, h), strict=True):
            out[col].append(val)
    return pd.DataFrame(out).astype({"image_id": str, "finding": str, "x": float, "y": float, "w": float, "h": float})


# --------------------------------------------------------------------------- splits


def assign_splits(patient_ids: np.ndarray, official: np.ndarray, val_fraction: float = 0.1, seed: int = 0) -> np.ndarray:
    """Train / val / test per image (METHOD.md data protocol).

    The official test list stays ``test``; ``round(val_fraction * P)`` of the P train_val patients
    (sorted ids, permuted by ``np.random.default_rng(seed)``) become ``val``; the rest ``train``.

    Args:
        patient_ids: (N,) int patient of each image.
        official: (N,) str ``"train_val"``, ``"test"`` or ``""`` (no split; stays ``""``).

    Returns:
        (N,) object array of ``"train"``, ``"val"``, ``"test"`` or ``""``.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    patient_ids = np.asarray(patient_ids, dtype=np.int64)
    official = np.asarray(official, dtype=object)
    train_val = official == "train_val"
    patients = np.unique(patient_ids[train_val])
    n_val = int(round(val_fraction * len(patients)))
    val_patients = np.random.default_rng(seed).permutation(patients)[:n_val]
    splits = np.full(len(patient_ids), "", dtype=object)
    splits[official == "test"] = "test"
    splits[train_val] = np.where(np.isin(patient_ids[train_val], val_patients), "val", "train")
    return splits


def check_patient_disjoint(patient_ids: np.ndarray, splits: np.ndarray) -> None:
    """Raise ValueError naming the patients that appear in more than one of train / val / test."""
    df = pd.DataFrame({"p": np.asarray(patient_ids), "s": np.asarray(splits, dtype=object)})
    df = df[df["s"].isin(SPLITS)]
    per_patient = df.groupby("p")["s"].nunique()
    shared = per_patient[per_patient > 1].index.to_numpy()
    if len(shared):
        raise ValueError(f"{len(shared)} patient(s) appear in more than one split, e.g. {shared[:10].tolist()}")


# --------------------------------------------------------------------------- everything together


def read_dataset(root: str | Path, val_fraction: float = 0.1, split_seed: int = 0, keep_messages: int = 200) -> ChestXray14:
    """Scan, parse and validate a dataset folder; assign splits; match images to rows.

    Raises:
        DatasetError: nothing usable (no Data_Entry, neither split list, bad Data_Entry header).
    Problems that leave something usable are only recorded in ``.report``; call
    ``report.raise_if_problems()`` for strict mode.
    """
    root = Path(root)
    files = scan_dataset(root)
    report = ValidationReport(keep=keep_messages)
    entry_path = next((files.metadata[n] for n in DATA_ENTRY_NAMES if n in files.metadata), None)
    if entry_path is None:
        raise DatasetError(f"{root}: no {' or '.join(DATA_ENTRY_NAMES)} (plain or .gz) found below this folder")
    report.note(f"labels from {entry_path}")
    entries, seen_names = read_data_entry(entry_path, report)

    lists: dict[str, list[str]] = {}
    for name, split in ((TRAIN_VAL_NAME, "train_val"), (TEST_NAME, "test")):
        if name in files.metadata:
            lists[split] = read_name_list(files.metadata[name], report)
        else:
            report.add("missing_file", f"{root}: {name} not found below this folder")
    if not lists:
        raise DatasetError(f"{root}: neither {TRAIN_VAL_NAME} nor {TEST_NAME} found; the splits are unknown")
    official = _official_splits(entries, lists, seen_names, report)
    entries["official_split"] = official
    entries = _drop_patient_overlap(entries, report)
    entries["split"] = assign_splits(entries["patient_id"].to_numpy(), entries["official_split"].to_numpy(), val_fraction, split_seed)
    check_patient_disjoint(entries["patient_id"].to_numpy(), entries["split"].to_numpy())
    entries["path"] = _match_images(entries, files, seen_names, report)

    if BBOX_NAME in files.metadata:
        boxes = read_bbox_list(files.metadata[BBOX_NAME], set(entries["image_id"]), report)
    else:
        report.add("missing_file", f"{root}: {BBOX_NAME} not found below this folder (no ground-truth boxes)")
        boxes = pd.DataFrame({c: pd.Series(dtype=float if c in "xywh" else str) for c in BOX_COLUMNS})
    columns = ["image_id", "patient_id", "official_split", "split", "path", "line", *FINDINGS]
    entries = entries.loc[:, columns]
    usable = (entries["path"] != "") & (entries["split"] != "")
    report.stats.update(
        data_entry_rows=len(entries),
        image_files_found=sum(len(v) for v in files.images.values()),
        usable_images=int(usable.sum()),
        **{f"split_{s}": int((entries["split"] == s).sum()) for s in SPLITS},
        boxes=len(boxes),
        box_images=int(boxes["image_id"].nunique()),
    )
    return ChestXray14(root=root, entries=entries, boxes=boxes, report=report, files=files)


def _official_splits(entries: pd.DataFrame, lists: dict[str, list[str]], seen: set[str], report: ValidationReport) -> np.ndarray:
    membership: dict[str, str] = {}
    for split in ("train_val", "test"):
        for name in lists.get(split, []):
            if name not in seen:
                report.add("split_unknown", f"{TRAIN_VAL_NAME if split == 'train_val' else TEST_NAME}: {name} is not in Data_Entry")
            if name in membership and membership[name] != split:
                report.add("split_conflict", f"{name}: in both {TRAIN_VAL_NAME} and {TEST_NAME} (excluded)")
                membership[name] = "conflict"
            elif name not in membership:
                membership[name] = split
    out = np.array([membership.get(n, "") for n in entries["image_id"]], dtype=object)
    out[out == "conflict"] = ""
    for name, line in entries.loc[out == "", ["image_id", "line"]].itertuples(index=False):
        if name not in membership:
            report.add("split_missing", f"Data_Entry line {line}: {name} is in neither split list (excluded)")
    return out


def _drop_patient_overlap(entries: pd.DataFrame, report: ValidationReport) -> pd.DataFrame:
    """A patient in both official lists: report it; its train_val images lose their split (test is kept)."""
    official = entries["official_split"]
    overlap = np.intersect1d(entries.loc[official == "train_val", "patient_id"], entries.loc[official == "test", "patient_id"])
    for pid in overlap[: report.keep]:
        names = entries.loc[entries["patient_id"] == pid, "image_id"].tolist()
        report.add("patient_overlap", f"patient {pid}: images in both lists, e.g. {names[:4]} (its train_val images excluded)")
    for _ in overlap[report.keep :]:
        report.add("patient_overlap", "(further patients not listed)")
    if len(overlap):
        entries = entries.copy()
        entries.loc[entries["patient_id"].isin(overlap) & (official == "train_val"), "official_split"] = ""
    return entries


def _match_images(entries: pd.DataFrame, files: DatasetFiles, seen: set[str], report: ValidationReport) -> np.ndarray:
    """Path per entry ("" when absent). Exact file name first, else a unique file with the same stem."""
    by_stem: dict[str, list[str]] = defaultdict(list)
    for name in files.images:
        by_stem[Path(name).stem].append(name)
    seen_stems = {Path(n).stem for n in seen}
    paths = []
    for name, line in entries[["image_id", "line"]].itertuples(index=False):
        key = name if name in files.images else None
        if key is None:
            same_stem = by_stem.get(Path(name).stem, [])
            key = same_stem[0] if len(same_stem) == 1 else None
        if key is None:
            report.add("listed_absent", f"{name} (Data_Entry line {line}): no image file found")
            paths.append("")
            continue
        candidates = files.images[key]
        if len(candidates) > 1:
            others = ", ".join(str(p) for p in candidates[1:4])
            report.add("duplicate_name", f"{name}: {len(candidates)} files, using {candidates[0]} (also {others})")
        paths.append(str(candidates[0]))
    for name, candidates in files.images.items():
        if name not in seen and Path(name).stem not in seen_stems:
            for p in candidates:
                report.add("unlisted_image", f"{p}: not listed in Data_Entry")
    return np.asarray(paths, dtype=object)


def raise_if_strict(dataset: ChestXray14, lenient: bool) -> None:
    """Strict mode (``lenient=False``): raise :class:`DatasetValidationError` if any problem was found."""
    if not lenient:
        dataset.report.raise_if_problems()


__all__ = [
    "ChestXray14",
    "DatasetError",
    "DatasetFiles",
    "DatasetValidationError",
    "assign_splits",
    "check_patient_disjoint",
    "read_bbox_list",
    "read_data_entry",
    "read_dataset",
    "read_name_list",
    "scan_dataset",
]
