"""Run a model over a cache split once and keep what scoring needs in ``predictions.npz``.

``predictions.npz`` holds (N images of the split, M of them with ground-truth boxes):

    image_ids (N,) str, patient_ids (N,) int64, rows (N,) int64 cache rows,
    labels (N, 14) uint8, probs (N, 14) float32 (eq. 10), logits (N, 14) float32 (global),
    orig_sizes (N, 2) int64 (width, height),
    map_index (M,) int64 positions (into the N images) of the box images,
    maps (M, 14, h, w) float32 eq. 11 maps on the model's grid (e.g. 7 x 7), normalised to [0, 1],
    meta: a JSON string: checkpoint path + SHA-256, split, cache identity (SHA-256 of its
          files from meta.json), cxrloc version, creation time.

The maps stay on the grid (tens of KB per image, not 1024 x 1024): scoring upsamples them
to the original image size (:mod:`cxrloc.evaluate.boxes`). Re-scoring with other options
(box mode, thresholds, folds, bootstrap) reuses the file; it is recomputed when the
checkpoint or the cache differ from the ones it was made with.
"""

from __future__ import annotations

import json
import logging
import zipfile
import zlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from cxrloc import __version__
from cxrloc.config import DataConfig
from cxrloc.data.cache import Cache
from cxrloc.data.dataset import load_batch
from cxrloc.data.transforms import batch_transform
from cxrloc.fileio import atomic_open
from cxrloc.labels import FINDINGS, canonical

log = logging.getLogger(__name__)

PREDICTIONS_FILE = "predictions.npz"
PREDICTIONS_FORMAT = 1


@dataclass
class Predictions:
    """Network outputs on one split (see the module docstring for the arrays)."""

    image_ids: np.ndarray
    patient_ids: np.ndarray
    rows: np.ndarray
    labels: np.ndarray
    probs: np.ndarray
    logits: np.ndarray
    orig_sizes: np.ndarray
    map_index: np.ndarray
    maps: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)
    _pos: dict[str, int] | None = field(default=None, repr=False)
    _map_pos: dict[str, int] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.image_ids)

    def position(self, image_id: str) -> int:
        """Index of an image among the N predictions."""
        if self._pos is None:
            self._pos = {name: i for i, name in enumerate(self.image_ids)}
        try:
            return self._pos[image_id]
        except KeyError:
            raise KeyError(f"{image_id!r} is not among the predicted images") from None

    def grid_map(self, image_id: str, finding: str) -> np.ndarray:
        """(h, w) eq. 11 map of ``finding`` on a box image."""
        if self._map_pos is None:
            self._map_pos = {str(self.image_ids[i]): m for m, i in enumerate(self.map_index)}
        try:
            m = self._map_pos[image_id]
        except KeyError:
            raise KeyError(f"no stored map for {image_id!r} (maps are kept for box images only)") from None
        return self.maps[m, FINDINGS.index(canonical(finding))]

    def size_of(self, image_id: str) -> tuple[int, int]:
        """Original (width, height) of an image."""
        w, h = self.orig_sizes[self.position(image_id)]
        return int(w), int(h)

    def save(self, path: str | Path) -> None:
        """Write atomically as a compressed ``.npz``."""
        arrays = {
            "image_ids": self.image_ids.astype(str),
            "patient_ids": self.patient_ids,
            "rows": self.rows,
            "labels": self.labels,
            "probs": self.probs,
            "logits": self.logits,
            "orig_sizes": self.orig_sizes,
            "map_index": self.map_index,
            "maps": self.maps,
            "meta": np.array(json.dumps({"format": PREDICTIONS_FORMAT, **self.meta})),
        }
        with atomic_open(path) as f:
            np.savez_compressed(f, **arrays)

    @classmethod
    def load(cls, path: str | Path) -> Predictions:
        """Read a file written by :meth:`save`; a clear error names the file if it is unusable."""
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                data = {k: z[k] for k in z.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:  # truncated, bit-flipped
            raise ValueError(f"{path}: not a readable predictions file ({e})") from e
        missing = [k for k in ("image_ids", "probs", "labels", "maps", "map_index", "meta") if k not in data]
        if missing:
            raise ValueError(f"{path}: predictions file lacks {missing}")
        meta = json.loads(str(data.pop("meta")))
        if meta.get("format") != PREDICTIONS_FORMAT:
            raise ValueError(f"{path}: predictions format {meta.get('format')!r}, this version reads {PREDICTIONS_FORMAT}")
        return cls(meta=meta, **data)


def cache_identity(cache: Cache) -> dict[str, Any]:
    """What identifies a cache's content cheaply: the SHA-256 of its files recorded in meta.json."""
    files = cache.meta.get("files", {})
    return {"root": str(cache.root), "sha256": {k: v.get("sha256") for k, v in files.items()}, "count": len(cache)}


def box_image_positions(image_ids: np.ndarray, box_image_ids: np.ndarray) -> np.ndarray:
    """Positions (into ``image_ids``) of the images that have a ground-truth box, in order."""
    wanted = set(np.asarray(box_image_ids).astype(str).tolist())
    return np.array([i for i, name in enumerate(np.asarray(image_ids).astype(str)) if name in wanted], dtype=np.int64)


@torch.inference_mode()
def run_predictions(
    model: torch.nn.Module,
    cache: Cache,
    split: str,
    data_cfg: DataConfig,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    channels_last: bool = False,
    progress: bool = True,
    meta: dict[str, Any] | None = None,
    hflip_tta: bool = False,
) -> Predictions:
    """Run ``model.predict`` (eq. 10-11) over every image of a split.

    Args:
        model: a DLRV in eval mode.
        cache: the prepared cache.
        split: ``"train"``, ``"val"`` or ``"test"``.
        data_cfg: the model's data config (input size, normalisation).
        batch_size: images per forward pass.
        device: where the model runs.
        channels_last: feed NHWC tensors (faster on CPUs with oneDNN and on GPUs).
        progress: tqdm bar.
        meta: extra identity stored with the predictions (checkpoint path and hash).
        hflip_tta: average with the mirrored image (``DLRV.predict``; config ``eval.hflip_tta``).

    Returns:
        :class:`Predictions` with maps for the split's box images.
    """
    rows = cache.indices(split)
    if len(rows) == 0:
        raise ValueError(f"{cache.root}: split {split!r} has no images")
    image_ids = cache.image_ids[rows].astype(str)
    box_ids = cache.boxes["image_id"].astype(str).to_numpy() if len(cache.boxes) else np.array([], dtype=str)
    map_index = box_image_positions(image_ids, box_ids)
    is_box = np.zeros(len(rows), dtype=bool)
    is_box[map_index] = True
    device = torch.device(device)
    model.eval().to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    probs = np.zeros((len(rows), len(FINDINGS)), dtype=np.float32)
    logits = np.zeros_like(probs)
    maps: np.ndarray | None = None
    for start in tqdm(range(0, len(rows), batch_size), desc=f"predict {split}", disable=not progress, unit="batch"):
        stop = min(start + batch_size, len(rows))
        batch = load_batch(cache, rows[start:stop])
        x = batch_transform(batch["image"].to(device), data_cfg, train=False)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out = model.predict(x, hflip_tta=hflip_tta)
        probs[start:stop] = out["probs"].float().cpu().numpy()
        logits[start:stop] = out["logits"].float().cpu().numpy()
        if maps is None:
            maps = np.zeros((len(map_index), len(FINDINGS), *out["cam_grid"].shape[-2:]), dtype=np.float32)
        sel = np.flatnonzero(is_box[start:stop])
        if len(sel):
            dest = np.searchsorted(map_index, start + sel)
            maps[dest] = out["cam_grid"][torch.from_numpy(sel).to(out["cam_grid"].device)].float().cpu().numpy()
    assert maps is not None
    info = {
        "split": split,
        "cache": cache_identity(cache),
        "cxrloc_version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "hflip_tta": bool(hflip_tta),
        **(meta or {}),
    }
    return Predictions(
        image_ids=image_ids,
        patient_ids=cache.patient_ids[rows].astype(np.int64),
        rows=rows.astype(np.int64),
        labels=cache.labels[rows].astype(np.uint8),
        probs=probs,
        logits=logits,
        orig_sizes=cache.orig_sizes[rows].astype(np.int64),
        map_index=map_index,
        maps=maps,
        meta=info,
    )


def load_or_run_predictions(
    path: str | Path,
    model_loader: Any,
    cache: Cache,
    split: str,
    identity: dict[str, Any],
    recompute: bool = False,
    **run_kwargs: Any,
) -> tuple[Predictions, bool]:
    """Reuse ``path`` when it was made from the same checkpoint, cache, split and TTA; else run and save.

    Args:
        path: the predictions file.
        model_loader: zero-argument callable returning ``(model, data_cfg)``; only called when
            the network has to run.
        cache, split: what to predict.
        identity: ``{"checkpoint": {"path", "sha256"}}`` stored in and compared with the file.
        recompute: ignore an existing file.
        **run_kwargs: passed to :func:`run_predictions`.

    Returns:
        (predictions, reused): reused is True when the file was read instead of recomputed.
    """
    path = Path(path)
    if path.exists() and not recompute:
        try:
            preds = Predictions.load(path)
        except ValueError as e:
            log.warning("%s; recomputing", e)
        else:
            stale = _stale_reason(preds.meta, cache, split, identity, bool(run_kwargs.get("hflip_tta", False)))
            if stale is None:
                log.info("reusing %s", path)
                return preds, True
            log.warning("%s was made from %s; recomputing", path, stale)
    model, data_cfg = model_loader()
    preds = run_predictions(model, cache, split, data_cfg, meta=identity, **run_kwargs)
    preds.save(path)
    return preds, False


def _stale_reason(
    meta: dict[str, Any], cache: Cache, split: str, identity: dict[str, Any], hflip_tta: bool = False
) -> str | None:
    if meta.get("split") != split:
        return f"split {meta.get('split')!r}, not {split!r}"
    if bool(meta.get("hflip_tta", False)) != hflip_tta:
        return f"hflip_tta={bool(meta.get('hflip_tta', False))}, not {hflip_tta}"
    if meta.get("cache", {}).get("sha256") != cache_identity(cache)["sha256"]:
        return "another cache"
    ours = identity.get("checkpoint", {}).get("sha256")
    theirs = meta.get("checkpoint", {}).get("sha256")
    if ours != theirs:
        return "another checkpoint"
    return None
