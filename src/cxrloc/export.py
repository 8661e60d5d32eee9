"""Export a checkpoint to ONNX for deployment (onnxruntime, TensorRT, ...), with the metadata that says how to feed it.

The exported graph is self-contained from pixels to the paper's outputs:

    image     (B, 1, S, S) float32, grayscale pixel values 0..255, S = ``input_size`` (default 256,
              the decode size of ``cxrloc predict`` and ``cxrloc prepare``)
      -> bilinear resize to the checkpoint's ``data.image_size`` and ImageNet normalisation,
         replicated to 3 channels (exactly ``cxrloc.data.transforms.batch_transform``, eval path)
      -> ``DLRV.predict_traceable(x, hflip_tta)``: ``DLRV.predict`` (eq. 10-11, with ``hflip_tta``
         on x and its mirror image) without inference_mode
    probs     (B, 14)  eq. 10: sigmoid(global + class-specific region logits)
    logits    (B, 14)  global logits (eq. 1, or LSE pooling when the checkpoint uses it)
    cam_grid  (B, 14, h, w)  eq. 11 maps, min-max normalised to [0, 1] on the feature grid

B is dynamic. To get S x S from a file, decode it to grayscale and resize the whole image (no
crop) with Lanczos, as :func:`cxrloc.data.io.read_image_resized` does (16-bit images scaled to
0..255, DICOM MONOCHROME1 inverted). A box for finding c: upsample ``cam_grid[c]`` bilinearly
to the original size, keep pixels > the map threshold, take the bounding box of the connected
component holding the maximum (:func:`cxrloc.evaluate.boxes.boxes_from_map`).

Beside ``model.onnx`` goes ``model.json`` (schema ``cxrloc.export/1``): the checkpoint's
identity and SHA-256, the findings in output order, the input and output specification, the
thresholds, and the verification: onnxruntime against PyTorch on two batch sizes. The same
JSON is stored in the ONNX file's ``metadata_props`` under ``cxrloc``. An export whose global
logits or maps differ from PyTorch's by more than :data:`TOLERANCE` writes nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import json
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cxrloc import __version__
from cxrloc.config import Config
from cxrloc.data.transforms import DIRECT_RESAMPLE_MAX_SCALE
from cxrloc.fileio import atomic_write_bytes, atomic_write_json, sha256_file
from cxrloc.labels import FINDINGS
from cxrloc.model.checkpoint import load_model
from cxrloc.model.dlrv import DLRV

log = logging.getLogger(__name__)

SCHEMA = "cxrloc.export/1"
ONNX_NAME, JSON_NAME = "model.onnx", "model.json"
DEFAULT_OPSET = 18
#: max |onnxruntime - PyTorch| allowed for the global logits and the maps (float32 kernels differ in rounding)
TOLERANCE = 1e-3
OUTPUTS = ("probs", "logits", "cam_grid")


class ExportError(RuntimeError):
    """The export could not be made or does not reproduce the PyTorch model."""


class InferenceGraph(nn.Module):
    """Pixels (B, 1, S, S) in 0..255 -> (probs, logits, cam_grid); see the module docstring.

    Args:
        model: DLRV in eval mode.
        cfg: its config (``data.image_size``, ``data.mean``, ``data.std``).
        hflip_tta: also run the mirrored image and merge (``eval.hflip_tta``).
    """

    def __init__(self, model: DLRV, cfg: Config, hflip_tta: bool = False) -> None:
        super().__init__()
        self.model = model.eval()
        self.image_size = int(cfg.data.image_size)
        self.hflip_tta = hflip_tta
        mean = torch.tensor(cfg.data.mean, dtype=torch.float64)
        std = torch.tensor(cfg.data.std, dtype=torch.float64)
        # (x / 255 - mean_c) / std_c as one multiply-add, folded as batch_transform folds it
        self.register_buffer("scale", (1.0 / (255.0 * std)).float().view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", (-mean / std).float().view(1, 3, 1, 1), persistent=False)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, size = image, (self.image_size, self.image_size)
        if tuple(x.shape[-2:]) != size:  # as batch_transform: antialiased when shrinking by more than 1.5x
            antialias = max(x.shape[-2:]) > DIRECT_RESAMPLE_MAX_SCALE * self.image_size
            x = F.interpolate(x, size=size, mode="bilinear", antialias=antialias, align_corners=False)
        x = torch.addcmul(self.shift, x, self.scale)  # (B, 1, H, W) -> (B, 3, H, W)
        out = self.model.predict_traceable(x, self.hflip_tta)
        return out["probs"], out["logits"], out["cam_grid"]


def _require(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ExportError(f"cxrloc export needs the package {module!r}: pip install -e '.[onnx]' "
                          "(onnx, onnxruntime, onnxscript)") from e


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter's INFO logs (hundreds of graph-pass lines) only at cxrloc's debug level."""
    loggers = [logging.getLogger(name) for name in ("onnx_ir", "onnxscript", "torch.onnx", "torch.export")]
    levels = [lg.level for lg in loggers]
    quiet = logging.WARNING if not log.isEnabledFor(logging.DEBUG) else logging.NOTSET
    for lg in loggers:
        lg.setLevel(max(lg.level, quiet))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def verification_images(batch: int, size: int, seed: int = 0) -> np.ndarray:
    """(batch, 1, size, size) float32 smooth random images in 0..255 (low-frequency noise, like X-ray intensities)."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 1, 8, 8, generator=gen)
    smooth = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
    return (255.0 * smooth).numpy().astype(np.float32)


def compare(session: Any, graph: InferenceGraph, images: np.ndarray) -> dict[str, float]:
    """max |onnxruntime - PyTorch| per output on ``images``."""
    got = session.run(list(OUTPUTS), {"image": images})
    with torch.inference_mode():
        want = graph(torch.from_numpy(images))
    return {name: float(np.abs(g - w.numpy()).max()) for name, g, w in zip(OUTPUTS, got, want, strict=True)}


def export_onnx(
    checkpoint: str | Path,
    out_dir: str | Path,
    input_size: int = 256,
    opset: int = DEFAULT_OPSET,
    hflip_tta: bool | None = None,
) -> dict[str, Any]:
    """Export ``checkpoint`` to ``out_dir/model.onnx`` + ``model.json`` (written atomically, after verification).

    Args:
        checkpoint: a ``cxrloc train`` checkpoint.
        out_dir: output folder (created).
        input_size: side S of the graph's input images.
        opset: ONNX opset version.
        hflip_tta: bake the mirror-image averaging into the graph (default: the checkpoint's ``eval.hflip_tta``).

    Returns:
        The metadata written to ``model.json``.

    Raises:
        ExportError: a missing package, a failed export, or onnxruntime disagreeing with PyTorch.
        CheckpointError: an unreadable or mismatched checkpoint.
    """
    onnx = _require("onnx")
    ort = _require("onnxruntime")
    _require("onnxscript")
    if input_size < 32:
        raise ValueError(f"input_size must be >= 32, got {input_size}")
    out = Path(out_dir)
    model, cfg, ckpt = load_model(checkpoint)
    tta = cfg.eval.hflip_tta if hflip_tta is None else bool(hflip_tta)
    graph = InferenceGraph(model, cfg, hflip_tta=tta).eval()
    example = torch.from_numpy(verification_images(2, input_size))
    batch = torch.export.Dim("batch", min=1, max=4096)
    try:
        with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()) as said, _quiet_exporter():
            program = torch.onnx.export(graph, (example,), dynamo=True, opset_version=opset, input_names=["image"],
                                        output_names=list(OUTPUTS), dynamic_shapes=({0: batch},))
            program.save(str(Path(tmp) / ONNX_NAME))
            proto = onnx.load(str(Path(tmp) / ONNX_NAME))
        log.debug("torch.onnx.export said: %s", said.getvalue())
    except Exception as e:  # the exporter raises many types; the message names the checkpoint
        raise ExportError(f"{checkpoint}: ONNX export failed: {type(e).__name__}: {e}") from e

    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    checks = {str(b): compare(session, graph, verification_images(b, input_size, seed=b)) for b in (2, 3)}
    worst = {k: max(c[k] for c in checks.values()) for k in OUTPUTS}
    if worst["logits"] > TOLERANCE or worst["cam_grid"] > TOLERANCE:
        raise ExportError(f"{checkpoint}: onnxruntime differs from PyTorch by {worst} (tolerance {TOLERANCE} for "
                          "logits and cam_grid); nothing written")

    h, w = graph(example[:1])[2].shape[-2:]
    meta = {
        "schema": SCHEMA,
        "file": ONNX_NAME,
        "format": "onnx",
        "opset": opset,
        "versions": {"cxrloc": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
                     "onnxruntime": ort.__version__},
        "model": {"checkpoint": str(checkpoint), "sha256": sha256_file(checkpoint), "config": cfg.name,
                  "variant": cfg.variant, "epoch": ckpt.get("epoch"), "image_size": int(cfg.data.image_size)},
        "findings": list(FINDINGS),
        "input": {"name": "image", "shape": ["batch", 1, input_size, input_size], "dtype": "float32",
                  "values": "grayscale pixels 0..255: decode, then resize the whole image (no crop) to "
                            f"{input_size} x {input_size} with Lanczos (cxrloc.data.io.read_image_resized)"},
        "outputs": {
            "probs": {"shape": ["batch", len(FINDINGS)], "meaning": "eq. 10 probabilities, findings in order"},
            "logits": {"shape": ["batch", len(FINDINGS)], "meaning": "global logits"},
            "cam_grid": {"shape": ["batch", len(FINDINGS), int(h), int(w)],
                         "meaning": "eq. 11 localization maps in [0, 1]; upsample bilinearly to the image for boxes"},
        },
        "hflip_tta": tta,
        "thresholds": {"decision": 0.5, "map": float(cfg.eval.map_threshold), "box_mode": cfg.eval.box_mode,
                       "region_cam_eq8": float(cfg.model.cam_threshold)},
        "verification": {"runtime": "onnxruntime CPUExecutionProvider", "tolerance": TOLERANCE,
                         "max_abs_diff": worst, "per_batch_size": checks},
    }
    entry = proto.metadata_props.add()
    entry.key, entry.value = "cxrloc", json.dumps(meta)
    data = proto.SerializeToString()
    meta["sha256"] = hashlib.sha256(data).hexdigest()  # of model.onnx (not inside it)
    atomic_write_bytes(out / ONNX_NAME, data)
    atomic_write_json(out / JSON_NAME, meta)
    return meta
