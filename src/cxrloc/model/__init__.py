"""The DLRV model: backbone, global/region classifiers, CAM region verification, losses, checkpoints.

Example:
    >>> from cxrloc.config import load_config
    >>> cfg = load_config("dlrv", ["model.backbone=densenet-tiny", "model.pretrained=false"])
    >>> model = build_model(cfg.model, use_region=cfg.loss.use_rv)
    >>> criterion = DLRVLoss(cfg.loss)
"""

from __future__ import annotations

from cxrloc.model.backbone import create_backbone
from cxrloc.model.checkpoint import CheckpointError, load_checkpoint, load_model, save_checkpoint
from cxrloc.model.dlrv import DLRV, build_model, upsample_maps
from cxrloc.model.losses import DLRVLoss

__all__ = [
    "DLRV",
    "CheckpointError",
    "DLRVLoss",
    "build_model",
    "create_backbone",
    "load_checkpoint",
    "load_model",
    "save_checkpoint",
    "upsample_maps",
]
