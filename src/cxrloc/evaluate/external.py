"""Another model's outputs, scored with this package's protocol: ``cxrloc evaluate --predictions FILE``.

Researchers compare DLRV with their own or published models (CheXNet-style DenseNets,
torchxrayvision's, ...). Given that model's scores on a prepared cache's split, ``evaluate``
computes the same Table 1 and Table 2 numbers as for a checkpoint, and writes a folder that
``cxrloc compare`` pairs with DLRV runs.

Scores: a CSV with one row per image. The image column is ``image_id``, ``Image Index``
(ChestX-ray14's name) or ``file`` (``cxrloc predict``'s ``predictions.csv``), file names or paths
(matched by file name); the finding columns are the 14 findings by name (any case, spaces or
underscores: ``Pleural Thickening``, ``pleural_thickening``; ``Infiltrate`` for Infiltration).
Any score works (AUC only uses their order). Other columns (``Fracture``, ``Lung Opacity``, a
path, ...) are ignored and listed in ``metrics.json``. Every image of the split needs a row;
rows of other images are ignored and counted.

Maps (optional; without them only AUC is computed): an ``.npz`` with ``image_ids`` (M,; file
names or paths, as above) and ``maps`` (M, 14, h, w) in the finding order above (or in the order
of an optional ``findings`` array), any grid size; each map is min-max normalised to [0, 1] like
eq. 11's, so the CAM thresholds mean the same for every model. Every box image of the split
needs one. ``cxrloc predict --save-maps`` writes both files in these formats.
"""

from __future__ import annotations

import re
import zipfile
import zlib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxrloc import __version__
from cxrloc.data.cache import Cache
from cxrloc.evaluate.runner import Predictions, box_image_positions, cache_identity
from cxrloc.fileio import sha256_file
from cxrloc.labels import ALIASES, FINDINGS

IMAGE_COLUMNS = ("image_id", "Image Index", "file")  # "file": what `cxrloc predict` writes
_KEY = {re.sub(r"[\s_]+", "_", n).lower(): n for n in (*FINDINGS, *ALIASES)}


def finding_of_column(column: str) -> str | None:
    """The canonical finding a column header names, or None (``"Pleural Thickening"`` -> ``Pleural_Thickening``)."""
    name = _KEY.get(re.sub(r"[\s_]+", "_", str(column).strip()).lower())
    return ALIASES.get(name, name) if name else None


def _file_names(ids: pd.Series) -> pd.Series:
    """Image ids as file names: paths (``images_001/images/00000001_000.png``) match by their last part."""
    return ids.str.strip().str.replace(r"^.*[\\/]", "", regex=True)


def read_scores(path: str | Path) -> tuple[pd.DataFrame, list[str]]:
    """(scores indexed by image id with the 14 findings as columns, ignored column names) from a CSV."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: predictions file not found")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a readable CSV ({e})") from e
    image_col = next((c for c in IMAGE_COLUMNS if c in df.columns), None)
    if image_col is None:
        raise ValueError(f"{path}: no image column (expected one of {', '.join(IMAGE_COLUMNS)}); columns: {list(df.columns)}")
    mapping: dict[str, str] = {}
    ignored = []
    for c in df.columns:
        if c == image_col:
            continue
        f = finding_of_column(c)
        if f is None:
            ignored.append(c)
        elif f in mapping.values():
            raise ValueError(f"{path}: two columns name {f} ({[k for k, v in mapping.items() if v == f][0]!r} and {c!r})")
        else:
            mapping[c] = f
    missing = [f for f in FINDINGS if f not in mapping.values()]
    if missing:
        raise ValueError(f"{path}: no column for {', '.join(missing)} (all 14 findings are needed)")
    ids = _file_names(df[image_col])
    dup = ids[ids.duplicated()]
    if len(dup):
        raise ValueError(f"{path}: image {dup.iloc[0]!r} has {int((ids == dup.iloc[0]).sum())} rows")
    scores = df[list(mapping)].rename(columns=mapping)[list(FINDINGS)]
    values = scores.apply(pd.to_numeric, errors="coerce")
    bad = ~np.isfinite(values.to_numpy(dtype=np.float64))
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise ValueError(f"{path}: line {r + 2}, column {FINDINGS[c]}: {scores.iat[r, c]!r} is not a finite number"
                         f" ({int(bad.sum())} such cells)")
    values.index = ids.to_numpy()
    return values, ignored


def read_maps(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(image ids (M,), maps (M, 14, h, w) float32 in FINDINGS order, each min-max normalised to [0, 1])."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: maps file not found")
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise ValueError(f"{path}: not a readable .npz ({e})") from e
    for key in ("image_ids", "maps"):
        if key not in data:
            raise ValueError(f"{path}: no array {key!r} (has {sorted(data)})")
    ids, maps = _file_names(pd.Series(data["image_ids"].astype(str))).to_numpy(), data["maps"]
    if maps.ndim != 4 or maps.shape[0] != len(ids) or maps.shape[1] != len(FINDINGS):
        raise ValueError(f"{path}: maps must be (M, 14, h, w) with M = {len(ids)} image ids, got {maps.shape}")
    if "findings" in data:
        names = [finding_of_column(n) for n in data["findings"].astype(str)]
        if sorted(map(str, names)) != sorted(FINDINGS):
            raise ValueError(f"{path}: 'findings' must name the 14 findings once each, got {data['findings'].tolist()}")
        maps = maps[:, [names.index(f) for f in FINDINGS]]
    maps = maps.astype(np.float32)
    if not np.isfinite(maps).all():
        raise ValueError(f"{path}: maps hold NaN or infinite values")
    lo = maps.min(axis=(2, 3), keepdims=True)
    span = maps.max(axis=(2, 3), keepdims=True) - lo
    maps = np.where(span > 0, (maps - lo) / np.where(span > 0, span, 1), 0.0).astype(np.float32)  # eq. 11's scaling
    return ids, maps


def external_predictions(scores_path: str | Path, cache: Cache, split: str, maps_path: str | Path | None = None,
                         name: str | None = None) -> Predictions:
    """:class:`Predictions` of the split's images from a scores CSV (and maps), labels and patients from the cache."""
    scores_path = Path(scores_path)
    rows = cache.indices(split)
    if len(rows) == 0:
        raise ValueError(f"{cache.root}: split {split!r} has no images")
    image_ids = cache.image_ids[rows].astype(str)
    scores, ignored = read_scores(scores_path)
    absent = ~pd.Index(image_ids).isin(scores.index)
    if absent.any():
        raise ValueError(f"{scores_path}: no row for {int(absent.sum())} of the {len(image_ids)} {split} images "
                         f"(e.g. {image_ids[absent][0]})")
    probs = scores.loc[image_ids].to_numpy(dtype=np.float32)
    box_ids = cache.boxes["image_id"].astype(str).to_numpy() if len(cache.boxes) else np.array([], dtype=str)
    meta: dict[str, Any] = {
        "split": split, "cache": cache_identity(cache), "cxrloc_version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "external": {"name": name or scores_path.stem, "scores": str(scores_path), "scores_sha256": sha256_file(scores_path),
                     "ignored_columns": ignored, "rows_not_in_split": int(len(scores) - len(image_ids))},
    }
    if maps_path is None:
        map_index = np.zeros(0, dtype=np.int64)
        maps = np.zeros((0, len(FINDINGS), 1, 1), dtype=np.float32)
        meta["external"]["maps"] = None
    else:
        map_ids, all_maps = read_maps(maps_path)
        map_index = box_image_positions(image_ids, box_ids)
        wanted = image_ids[map_index]
        position = {m: i for i, m in enumerate(map_ids)}
        lacking = [w for w in wanted if w not in position]
        if lacking:
            raise ValueError(f"{maps_path}: no map for {len(lacking)} of the {len(wanted)} box images of the {split} "
                             f"split (e.g. {lacking[0]})")
        maps = all_maps[[position[w] for w in wanted]]
        meta["external"].update(maps=str(maps_path), maps_sha256=sha256_file(maps_path))
    return Predictions(
        image_ids=image_ids, patient_ids=cache.patient_ids[rows].astype(np.int64), rows=rows.astype(np.int64),
        labels=cache.labels[rows].astype(np.uint8), probs=probs, logits=np.full_like(probs, np.nan),
        orig_sizes=cache.orig_sizes[rows].astype(np.int64), map_index=map_index, maps=maps, meta=meta,
    )
