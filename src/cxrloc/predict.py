"""Run a trained model on image files: probabilities (eq. 10), boxes and heatmaps (eq. 11).

``cxrloc predict --checkpoint C INPUT... --out DIR`` writes ``DIR/predictions.json`` and, per
image, ``DIR/overlays/<name>.png`` (the image with the heatmap and labelled boxes). With
``--onnx EXPORT_DIR`` instead of ``--checkpoint`` the network runs in onnxruntime on the model
``cxrloc export`` wrote (:class:`OnnxPredictor`); everything else is the same.

Inputs: image files (PNG, JPEG, TIFF, BMP, DICOM; any name) and folders (searched recursively
for those extensions, sorted). Each image is decoded to 8-bit grayscale
(:func:`cxrloc.data.io.read_image_resized`: whole image, no crop, Lanczos to the cache size
``decode_size`` as in ``cxrloc prepare``), then resized and normalised exactly as in
evaluation (:func:`cxrloc.data.transforms.batch_transform`). Decoding runs in a thread pool
one batch ahead of the network. A file that cannot be read is reported in ``errors`` (and
logged) and the others finish.

JSON schema (``"schema": "cxrloc.predict/1"``)::

    {
      "schema": "cxrloc.predict/1", "cxrloc_version": str, "created": ISO time,
      "model": {"checkpoint": path, "sha256": hex, "config": name, "variant": str,
                "epoch": int, "image_size": int, "findings": [14 names],
                ("onnx": path, "onnx_sha256": hex: with --onnx)},
      "settings": {"decision_thresholds": {finding: float}, "map_threshold": float,
                   "box_mode": str, "decode_size": int, "hflip_tta": bool},
      "images": [
        {"file": path as given, "width": W, "height": H,        # original pixels
         "probabilities": {finding: float, ... 14},            # eq. 10
         "detections": [                                        # findings with p >= threshold
           {"finding": str, "probability": float, "threshold": float,
            "boxes": [{"x": float, "y": float, "w": float, "h": float, "score": float}]}
         ],                                                     # boxes in original pixels
         "overlay": "overlays/<name>.png" or null}
      ],
      "errors": [{"file": path, "error": message}],
      "files": {"csv": "predictions.csv", "maps": "maps.npz" or null}
    }

Beside it, ``predictions.csv`` (one row per image: file, width, height, the 14 probabilities) and,
with ``--save-maps``, ``maps.npz`` (``image_ids``: the files; ``maps`` (N, 14, h, w) eq. 11 grids;
``findings``): tables for pandas or numpy, in the formats ``cxrloc evaluate --predictions`` reads.

A detection's box comes from the finding's eq. 11 map upsampled to the original size and
thresholded at ``map_threshold`` (:mod:`cxrloc.evaluate.boxes`); its ``score`` is the finding's
probability (ours). Overlay and JSON paths are sanitised so nothing is written outside ``--out``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import re
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from cxrloc import __version__
from cxrloc.config import Config
from cxrloc.data.io import IMAGE_EXTENSIONS, read_image_resized
from cxrloc.data.transforms import batch_transform
from cxrloc.evaluate.boxes import BoxMode, boxes_from_map, upsample_map
from cxrloc.fileio import atomic_write_json, atomic_write_with, sha256_file
from cxrloc.labels import FINDINGS, canonical

log = logging.getLogger(__name__)

SCHEMA = "cxrloc.predict/1"
JSON_NAME = "predictions.json"
CSV_NAME = "predictions.csv"
MAPS_NAME = "maps.npz"
OVERLAY_DIR = "overlays"
DEFAULT_DECODE_SIZE = 256  # the default cache size of `cxrloc prepare`
OVERLAY_SIDE = 512  # long side of overlay images in pixels


# --------------------------------------------------------------------------- inputs and options


def collect_inputs(inputs: Sequence[str | Path]) -> tuple[list[Path], list[dict[str, str]]]:
    """Expand files and folders into a list of image files.

    Returns:
        (files, errors): files in the given order (folders: recursive, sorted, by extension);
        errors for inputs that do not exist or folders without images.
    """
    files: list[Path] = []
    errors: list[dict[str, str]] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                errors.append({"file": str(p), "error": f"folder has no image files ({', '.join(IMAGE_EXTENSIONS)})"})
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            errors.append({"file": str(p), "error": "no such file or folder"})
    return files, errors


def parse_thresholds(items: Sequence[str], default: float = 0.5) -> dict[str, float]:
    """Decision thresholds per finding from ``["0.4", "Mass=0.3", ...]`` (a bare number sets all).

    Raises:
        ValueError: an unknown finding or a value outside [0, 1].
    """
    out = dict.fromkeys(FINDINGS, float(default))
    per_finding: dict[str, float] = {}
    for item in items:
        name, sep, raw = item.rpartition("=")
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"--threshold {item!r}: expected a number or Finding=number") from None
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"--threshold {item!r}: must be in [0, 1]")
        if sep:
            per_finding[canonical(name)] = value
        else:
            out = dict.fromkeys(FINDINGS, value)
    out.update(per_finding)
    return out


def safe_name(path: Path, taken: set[str]) -> str:
    """A file name for an output derived from ``path``: [A-Za-z0-9._-] only, no leading dot, unique."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", path.stem)[:100].lstrip(".") or "image"
    name, k = stem, 1
    while name.lower() in taken:
        k += 1
        name = f"{stem}-{k}"
    taken.add(name.lower())
    return name


def inside(root: Path, path: Path) -> Path:
    """``path`` if it resolves inside ``root``; raises ValueError otherwise."""
    resolved = path.resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise ValueError(f"refusing to write {path}: outside the output folder {root}")
    return resolved


# --------------------------------------------------------------------------- the predictor


@dataclass
class Predictor:
    """A model plus the inference settings (see the module docstring).

    Args:
        model: DLRV in eval mode.
        cfg: its config (data transforms).
        decision_thresholds: finding -> probability threshold for reporting a box.
        map_threshold: CAM threshold on the [0, 1] map for the box.
        box_mode: ``"max_component"``, ``"all"`` or ``"components"``.
        decode_size: side the files are decoded to before the model's own resize.
        device: torch device.
        channels_last: NHWC input and weights (oneDNN is faster with them on many CPUs).
        bf16: autocast to bfloat16 (CPUs with AVX512-BF16/AMX, GPUs); CAMs stay float32.
        hflip_tta: also run the mirrored image and average (config ``eval.hflip_tta``).
    """

    model: torch.nn.Module
    cfg: Config
    decision_thresholds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(FINDINGS, 0.5))
    map_threshold: float = 0.5
    box_mode: BoxMode = "max_component"
    decode_size: int = DEFAULT_DECODE_SIZE
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    channels_last: bool = False
    bf16: bool = False
    hflip_tta: bool = False

    def __post_init__(self) -> None:
        self.model.eval().to(self.device)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self._thresholds = np.array([self.decision_thresholds[name] for name in FINDINGS])

    def run_batch(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(B, S, S) uint8 -> probabilities (B, 14) and eq. 11 grid maps (B, 14, h, w), float32 numpy."""
        images = images if images.flags.writeable else images.copy()
        x = batch_transform(torch.from_numpy(images).to(self.device), self.cfg.data, train=False)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            out = self.model.predict(x, hflip_tta=self.hflip_tta)
        return out["probs"].float().cpu().numpy(), out["cam_grid"].float().cpu().numpy()

    def detections(self, probs: np.ndarray, maps: np.ndarray, size: tuple[int, int]) -> list[dict[str, Any]]:
        """Detections of one image: findings with p >= threshold, each with its box(es) in original pixels."""
        out = []
        for c in np.flatnonzero(probs >= self._thresholds):
            boxes = boxes_from_map(maps[c], size, [self.map_threshold], self.box_mode)[0]
            p = float(probs[c])
            out.append({
                "finding": FINDINGS[c], "probability": p, "threshold": float(self._thresholds[c]),
                "boxes": [{"x": float(b[0]), "y": float(b[1]), "w": float(b[2]), "h": float(b[3]), "score": p} for b in boxes],
            })
        return out


@dataclass
class OnnxPredictor(Predictor):
    """A :class:`Predictor` that runs an exported ``model.onnx`` with onnxruntime (``cxrloc predict --onnx DIR``).

    Build it with :func:`load_onnx_predictor`. The graph holds the resize, the normalisation and
    (when exported so) the mirror-image TTA; ``decode_size`` is its input size. ``model`` and
    ``cfg`` are None: nothing here needs PyTorch's model.
    """

    session: Any = None

    def __post_init__(self) -> None:
        self._thresholds = np.array([self.decision_thresholds[name] for name in FINDINGS])

    def run_batch(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(B, S, S) uint8 -> probabilities (B, 14) and eq. 11 grid maps (B, 14, h, w), from onnxruntime."""
        probs, cams = self.session.run(["probs", "cam_grid"], {"image": images[:, None].astype(np.float32)})
        return probs, cams


def load_onnx_predictor(folder: str | Path, **settings: Any) -> tuple[OnnxPredictor, dict[str, Any]]:
    """An :class:`OnnxPredictor` for a ``cxrloc export`` folder, and the ``model`` block for the JSON.

    ``settings``: ``decision_thresholds``, ``map_threshold``, ``box_mode`` (defaults: the export's
    ``model.json``). Raises ValueError naming the file when ``model.json`` is missing or unreadable,
    its findings differ from this cxrloc's, or ``model.onnx`` does not match its recorded SHA-256.
    """
    from cxrloc.export import JSON_NAME, ONNX_NAME, SCHEMA

    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ValueError(f"--onnx {folder}: needs onnxruntime: pip install -e '.[onnx]'") from e

    folder = Path(folder)
    meta_path, onnx_path = folder / JSON_NAME, folder / ONNX_NAME
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{meta_path}: not a readable `cxrloc export` metadata file ({e})") from e
    if meta.get("schema") != SCHEMA or meta.get("findings") != list(FINDINGS):
        raise ValueError(f"{meta_path}: schema {meta.get('schema')!r} / findings do not match this cxrloc ({SCHEMA})")
    if not onnx_path.is_file() or sha256_file(onnx_path) != meta.get("sha256"):
        raise ValueError(f"{onnx_path}: missing, or its SHA-256 differs from {meta_path} (modified or truncated)")
    try:
        settings.setdefault("map_threshold", float(meta["thresholds"]["map"]))
        settings.setdefault("box_mode", meta["thresholds"]["box_mode"])
        decode_size, hflip_tta = int(meta["input"]["shape"][-1]), bool(meta["hflip_tta"])
        info = {**meta["model"], "findings": list(FINDINGS), "onnx": str(onnx_path), "onnx_sha256": meta["sha256"]}
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise ValueError(f"{meta_path}: incomplete `cxrloc export` metadata ({type(e).__name__}: {e})") from e
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    predictor = OnnxPredictor(model=None, cfg=None, decode_size=decode_size, hflip_tta=hflip_tta, session=session,
                              **settings)
    return predictor, info


def _decode(path: Path, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    return read_image_resized(path, size)


def _batches(files: list[Path], batch_size: int, size: int, workers: int) -> Iterator[list[tuple[Path, Any]]]:
    """Decoded batches, the next one decoding in the pool while the caller works on the current one.

    ``workers=0`` decodes in the calling thread, one batch at a time (no overlap).
    Yields lists of ``(path, (image, (W, H)))`` or ``(path, exception)``.
    """
    chunks = [files[i : i + batch_size] for i in range(0, len(files), batch_size)]
    if workers <= 0:
        for chunk in chunks:
            out = []
            for p in chunk:
                try:
                    out.append((p, _decode(p, size)))
                except Exception as e:  # noqa: BLE001 - reported per file, the run goes on
                    out.append((p, e))
            yield out
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        def submit(chunk: list[Path]) -> list[tuple[Path, Future]]:
            return [(p, pool.submit(_decode, p, size)) for p in chunk]

        pending = submit(chunks[0]) if chunks else []
        for k in range(len(chunks)):
            current = pending
            pending = submit(chunks[k + 1]) if k + 1 < len(chunks) else []
            out = []
            for p, fut in current:
                try:
                    out.append((p, fut.result()))
                except Exception as e:  # noqa: BLE001 - reported per file, the run goes on
                    out.append((p, e))
            yield out


def predict_files(
    predictor: Predictor,
    files: Sequence[Path],
    out_dir: str | Path,
    model_info: dict[str, Any],
    batch_size: int = 16,
    workers: int = 2,
    overlays: bool = True,
    progress: bool = True,
    errors: list[dict[str, str]] | None = None,
    save_maps: bool = False,
) -> dict[str, Any]:
    """Predict every file; write ``predictions.json``, ``predictions.csv`` (and overlays, and with ``save_maps``
    ``maps.npz``) under ``out_dir``; return the JSON document."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    errors = list(errors or [])
    images: list[dict[str, Any]] = []
    grids: list[np.ndarray] = []  # (14, h, w) eq. 11 maps, kept with save_maps
    taken: set[str] = set()
    bar = tqdm(total=len(files), desc="predict", unit="img", disable=not progress)
    for batch in _batches(list(files), batch_size, predictor.decode_size, workers):
        good = []
        for path, result in batch:
            if isinstance(result, Exception):
                msg = str(result) if str(path) in str(result) else f"{path}: {result}"
                log.warning("skipping %s", msg)
                errors.append({"file": str(path), "error": msg})
            else:
                good.append((path, *result))
        if good:
            probs, maps = predictor.run_batch(np.stack([g[1] for g in good]))
            for (path, image, size), p, m in zip(good, probs, maps, strict=True):
                record = {
                    "file": str(path), "width": int(size[0]), "height": int(size[1]),
                    "probabilities": {name: float(v) for name, v in zip(FINDINGS, p, strict=True)},
                    "detections": predictor.detections(p, m, size),
                    "overlay": None,
                }
                if overlays:
                    name = safe_name(path, taken)
                    target = inside(out, out / OVERLAY_DIR / f"{name}.png")
                    overlay = render_overlay(image, size, record, m)
                    atomic_write_with(target, lambda f, im=overlay: im.save(f, format="PNG"))
                    record["overlay"] = f"{OVERLAY_DIR}/{name}.png"
                images.append(record)
                if save_maps:
                    grids.append(np.asarray(m, dtype=np.float32))
        bar.update(len(batch))
    bar.close()
    doc = {
        "schema": SCHEMA,
        "cxrloc_version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": model_info,
        "settings": {
            "decision_thresholds": dict(predictor.decision_thresholds),
            "map_threshold": predictor.map_threshold,
            "box_mode": predictor.box_mode,
            "decode_size": predictor.decode_size,
            "hflip_tta": predictor.hflip_tta,
        },
        "images": images,
        "errors": errors,
        "files": {"csv": CSV_NAME, "maps": MAPS_NAME if save_maps else None},
    }
    _write_tables(out, images, grids if save_maps else None)
    atomic_write_json(inside(out, out / JSON_NAME), doc)
    return doc


def _write_tables(out: Path, images: list[dict[str, Any]], grids: list[np.ndarray] | None) -> None:
    """``predictions.csv`` (file, width, height, the 14 probabilities) and, given maps, ``maps.npz`` (``image_ids``
    = the files, ``maps`` (N, 14, h, w) eq. 11 grids in [0, 1], ``findings``): the formats that
    ``cxrloc evaluate --predictions ... --maps ...`` reads (:mod:`cxrloc.evaluate.external`)."""
    buffer = io.StringIO()
    table = csv.writer(buffer, lineterminator="\n")  # quotes file names holding commas or quotes
    table.writerow(["file", "width", "height", *FINDINGS])
    table.writerows([im["file"], im["width"], im["height"], *(repr(im["probabilities"][f]) for f in FINDINGS)]
                    for im in images)
    atomic_write_with(inside(out, out / CSV_NAME), lambda f: f.write(buffer.getvalue().encode("utf-8")))
    if grids is not None:
        arrays = {"image_ids": np.array([im["file"] for im in images], dtype=str),
                  "maps": np.stack(grids) if grids else np.zeros((0, len(FINDINGS), 1, 1), np.float32),
                  "findings": np.array(FINDINGS, dtype=str)}
        atomic_write_with(inside(out, out / MAPS_NAME), lambda f: np.savez_compressed(f, **arrays))


def model_identity(checkpoint: str | Path, cfg: Config, ckpt: dict[str, Any]) -> dict[str, Any]:
    """The ``model`` block of the JSON: checkpoint path and SHA-256, config name, variant, epoch."""
    return {
        "checkpoint": str(checkpoint),
        "sha256": sha256_file(checkpoint),
        "config": cfg.name,
        "variant": cfg.variant,
        "epoch": ckpt.get("epoch"),
        "image_size": int(cfg.data.image_size),
        "findings": list(FINDINGS),
    }


# --------------------------------------------------------------------------- overlays

_JET: np.ndarray | None = None


def _jet() -> np.ndarray:
    global _JET
    if _JET is None:
        from matplotlib import colormaps

        _JET = (colormaps["jet"](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.uint8)
    return _JET


def render_overlay(image: np.ndarray, size: tuple[int, int], record: dict[str, Any], maps: np.ndarray) -> Image.Image:
    """The image (original aspect, long side :data:`OVERLAY_SIDE`) with a heatmap and labelled boxes.

    The heatmap is the maximum of the detected findings' maps, or the most probable
    finding's map when nothing is detected (labelled as below threshold).
    """
    W, H = size
    scale = OVERLAY_SIDE / max(W, H)
    dw, dh = max(1, round(W * scale)), max(1, round(H * scale))
    gray = np.asarray(Image.fromarray(image).resize((dw, dh), Image.Resampling.BILINEAR), dtype=np.float32)
    detected = [FINDINGS.index(d["finding"]) for d in record["detections"]]
    probs = np.array([record["probabilities"][n] for n in FINDINGS])
    shown = detected or [int(np.argmax(probs))]
    heat = np.max(np.stack([upsample_map(maps[c], (dw, dh)) for c in shown]), axis=0)
    colour = _jet()[np.clip((heat * 255).astype(np.int64), 0, 255)].astype(np.float32)
    alpha = 0.35
    blended = (1 - alpha) * gray[..., None] + alpha * colour
    canvas = Image.fromarray(np.clip(blended, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(canvas)
    for k, det in enumerate(record["detections"]):
        color = _label_colour(det["finding"])
        for b in det["boxes"]:
            x0, y0 = b["x"] * dw / W, b["y"] * dh / H
            x1, y1 = (b["x"] + b["w"]) * dw / W, (b["y"] + b["h"]) * dh / H
            draw.rectangle([x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)], outline=color, width=2)
            draw.text((x0 + 3, y0 + 2 + 11 * (k % 3)), f"{det['finding']} {det['probability']:.2f}", fill=color)
    if not detected:
        c = shown[0]
        draw.text((4, 4), f"no finding over threshold; map of {FINDINGS[c]} (p={probs[c]:.2f})", fill=(255, 255, 255))
    return canvas


def _label_colour(name: str) -> tuple[int, int, int]:
    digest = hashlib.md5(name.encode()).digest()
    return (128 + digest[0] % 128, 128 + digest[1] % 128, 64 + digest[2] % 64)
