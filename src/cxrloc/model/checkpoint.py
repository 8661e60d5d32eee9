"""Checkpoints of plain types only, written atomically, read with ``torch.load(weights_only=True)``.

Format (``format == "cxrloc-checkpoint"``, ``format_version == 1``), a dict of:
    state_dict      model parameters and buffers (tensors)
    tensor_sha256   {name: SHA-256 hex of dtype, shape and bytes} for corruption detection
    config          ``Config.to_dict()`` of the run
    labels          list of the C class names (must equal ``cxrloc.labels.FINDINGS``)
    image_size      input side in pixels; backbone, num_features, num_classes
    epoch, metric   int, float or None
    versions        {"cxrloc", "torch", "torchvision"}
    extra           optional plain dict (optimizer / scheduler / sampler states, ...)

A file holding pickled objects other than plain containers and tensors is refused
(``weights_only=True``), so loading a checkpoint never runs code from it.
"""

from __future__ import annotations

import hashlib
import io
import logging
import pickle
import zipfile
import zlib
from pathlib import Path
from typing import IO, Any

import torch
import torchvision

import cxrloc
from cxrloc.config import Config, ConfigError
from cxrloc.fileio import atomic_write_bytes
from cxrloc.labels import FINDINGS
from cxrloc.model.dlrv import DLRV, build_model

log = logging.getLogger(__name__)

FORMAT = "cxrloc-checkpoint"
FORMAT_VERSION = 1
_REQUIRED = ("state_dict", "tensor_sha256", "config", "labels", "image_size", "backbone", "epoch")


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, unsafe or does not match the model; the message names the file."""


def tensor_sha256(tensor: torch.Tensor) -> str:
    """SHA-256 hex digest of a tensor's dtype, shape and raw bytes."""
    t = tensor.detach().to("cpu").contiguous()
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_checkpoint(
    path: str | Path,
    model: DLRV,
    cfg: Config,
    epoch: int,
    metric: float | None,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write a checkpoint atomically (temp file + rename).

    Args:
        path: destination file (``.pt``).
        model: the DLRV model (a DDP/compiled wrapper's ``.module`` / ``._orig_mod`` also works).
        cfg: the run's config (stored as a plain dict).
        epoch: epochs completed.
        metric: the selection metric (validation mean AUC) or None.
        extra: plain types and tensors only (optimizer.state_dict(), scheduler, sampler, step...).
    """
    model = _unwrap(model)
    state = {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}
    nonfinite = _nonfinite_tensors(state)
    if nonfinite:  # a diverged model never replaces a good checkpoint
        raise CheckpointError(f"{path}: not saved: {len(nonfinite)} weight tensor(s) hold NaN or inf, e.g. "
                              f"{nonfinite[:3]}; the previous file, if any, is unchanged")
    payload: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "state_dict": state,
        "tensor_sha256": {k: tensor_sha256(v) for k, v in state.items()},
        "config": cfg.to_dict(),
        "labels": list(FINDINGS),
        "image_size": int(cfg.data.image_size),
        "backbone": cfg.model.backbone,
        "num_features": int(model.num_features),
        "num_classes": int(model.num_classes),
        "epoch": int(epoch),
        "metric": None if metric is None else float(metric),
        "versions": {"cxrloc": str(cxrloc.__version__), "torch": str(torch.__version__),
                     "torchvision": str(torchvision.__version__)},
        "extra": extra or {},
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    _check_archive(buffer, path)  # CRC-32 of every record present (load_checkpoint relies on it)
    try:  # refuse to write what load_checkpoint could not read (e.g. objects in `extra`)
        buffer.seek(0)
        torch.load(buffer, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: not saved: the checkpoint must hold plain types only ({_first_line(e)})") from e
    atomic_write_bytes(path, buffer.getvalue())
    log.info("saved checkpoint %s (epoch %d, metric %s)", path, epoch, metric)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read and verify a checkpoint written by :func:`save_checkpoint`.

    Raises:
        CheckpointError: missing file, truncated/corrupt file, a pickle payload that is not
            plain data (refused unread), wrong format, missing fields, or checksum mismatch.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    _check_archive(path, path)  # before unpickling: a truncated or bit-flipped file is never read
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused to load: it holds pickled objects that are not plain data "
            f"(weights_only=True); it may be malicious or not a cxrloc checkpoint ({_first_line(e)})"
        ) from e
    except Exception as e:  # truncated zip, bad magic, EOF, ...
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({type(e).__name__}: {_first_line(e)})") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a cxrloc checkpoint (no format={FORMAT!r} field)")
    if ckpt.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {ckpt.get('format_version')!r}, this cxrloc reads {FORMAT_VERSION}"
        )
    missing = [k for k in _REQUIRED if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks fields {missing}")
    state, sums = ckpt["state_dict"], ckpt["tensor_sha256"]
    if set(state) != set(sums):
        raise CheckpointError(f"{path}: state_dict and checksum table list different tensors (corrupt)")
    bad = [k for k, v in state.items() if tensor_sha256(v) != sums[k]]
    if bad:
        raise CheckpointError(f"{path}: checksum mismatch in {len(bad)} tensor(s) (corrupt), e.g. {bad[:3]}")
    nonfinite = _nonfinite_tensors(state)
    if nonfinite:
        raise CheckpointError(f"{path}: {len(nonfinite)} weight tensor(s) hold NaN or inf (a diverged run?), "
                              f"e.g. {nonfinite[:3]}; refusing to use it")
    return ckpt


def load_model(
    path: str | Path, map_location: str | torch.device = "cpu", image_size: int | None = None
) -> tuple[DLRV, Config, dict[str, Any]]:
    """Rebuild the model of a checkpoint (eval mode) with strict key and shape matching.

    The model is built from the stored config with ``pretrained=False`` and no weights
    path (the checkpoint holds every weight), and ``use_region = config.loss.use_rv``.

    Args:
        path: checkpoint file.
        map_location: device for the tensors.
        image_size: when given, the input size the caller will feed; must equal the
            checkpoint's ``image_size``.

    Returns:
        (model in eval mode, Config, checkpoint dict).

    Raises:
        CheckpointError: everything :func:`load_checkpoint` raises, plus label-set, input
            size and architecture (missing / unexpected keys, shape) mismatches.
    """
    path = Path(path)
    ckpt = load_checkpoint(path, map_location)
    if list(ckpt["labels"]) != list(FINDINGS):
        raise CheckpointError(
            f"{path}: label set differs from this cxrloc's FINDINGS ({_label_difference(list(ckpt['labels']))}): "
            f"checkpoint {list(ckpt['labels'])} vs {list(FINDINGS)}"
        )
    try:
        cfg = Config.from_dict(ckpt["config"], source=f"{path} (stored config)")
    except ConfigError as e:
        raise CheckpointError(f"{path}: stored config is not valid for this cxrloc: {e}") from e
    if image_size is not None and int(image_size) != int(ckpt["image_size"]):
        raise CheckpointError(f"{path}: trained at image_size {ckpt['image_size']}, asked to run at {image_size}")
    if int(ckpt["image_size"]) != cfg.data.image_size:
        raise CheckpointError(
            f"{path}: image_size {ckpt['image_size']} differs from its config's data.image_size {cfg.data.image_size}"
        )
    cfg.model.pretrained = False
    cfg.model.weights_path = None
    model = build_model(cfg.model, num_classes=len(ckpt["labels"]), use_region=cfg.loss.use_rv)
    _check_state_matches(path, model, ckpt["state_dict"])
    model.load_state_dict(ckpt["state_dict"], strict=True)
    model.to(map_location).eval()
    return model, cfg, ckpt


def _check_state_matches(path: Path, model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[:5]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[:5]})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches (e.g. {shapes[:5]})")
        raise CheckpointError(f"{path}: weights do not fit the architecture of its config: " + "; ".join(parts))


def _check_archive(source: str | Path | IO[bytes], path: str | Path) -> None:
    """Check the zip container and the CRC-32 of every record (torch itself does not check them).

    Any truncation or bit flip anywhere in the file (weights, optimizer state, the pickled
    metadata) raises :class:`CheckpointError` before anything is unpickled.
    """
    try:
        with zipfile.ZipFile(source) as archive:
            crcs = [info.CRC for info in archive.infolist() if info.file_size]
            damaged = archive.testzip() if any(crcs) else None
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, zlib.error) as e:
        raise CheckpointError(
            f"{path}: corrupt or truncated checkpoint, or not a cxrloc checkpoint (not a complete zip archive: "
            f"{type(e).__name__}: {e}); plain pickle files are refused"
        ) from e
    if crcs and not any(crcs):
        raise CheckpointError(f"{path}: checkpoint written without CRC-32 checksums (torch.utils.serialization."
                              "config.save.compute_crc32 is off); corruption could not be detected")
    if damaged is not None:
        raise CheckpointError(f"{path}: corrupt checkpoint: CRC-32 mismatch in record {damaged!r} (bit flip or bad copy)")


def _nonfinite_tensors(state: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors that hold a NaN or an inf."""
    return [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def _label_difference(labels: list[Any]) -> str:
    """What differs between a checkpoint's class names and FINDINGS, in a few words."""
    extra = [n for n in labels if n not in FINDINGS]
    missing = [n for n in FINDINGS if n not in labels]
    if extra or missing or len(labels) != len(FINDINGS):
        return f"{len(labels)} classes vs {len(FINDINGS)}; only in the checkpoint: {extra}; missing: {missing}"
    i = next(i for i, (a, b) in enumerate(zip(labels, FINDINGS, strict=True)) if a != b)
    return f"same names in another order, first at position {i}: {labels[i]!r} vs {FINDINGS[i]!r}"


def _unwrap(model: torch.nn.Module) -> DLRV:
    for attr in ("module", "_orig_mod"):
        while hasattr(model, attr) and isinstance(getattr(model, attr), torch.nn.Module):
            model = getattr(model, attr)
    if not isinstance(model, DLRV):
        raise TypeError(f"save_checkpoint expects a DLRV model, got {type(model).__name__}")
    return model


def _first_line(e: BaseException) -> str:
    """The informative line of an error (torch's weights_only refusals bury it under advice)."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    for line in lines:
        if line.startswith("WeightsUnpickler error:"):
            return line.removeprefix("WeightsUnpickler error:").strip()
    return lines[0] if lines else type(e).__name__
