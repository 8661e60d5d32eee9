"""Embedding network f_theta: DenseNet feature extractors returning the last feature map g.

The rest of the model only depends on "a module that maps images (B, 3, H, W) to a
non-negative feature map g (B, K, h, w)"; :func:`create_backbone` returns that module
and K.

Backbones:
    ``densenet121``: torchvision DenseNet-121; g = ReLU(norm5(denseblock4(...))),
        shape (B, 1024, H/32, W/32), i.e. (B, 1024, 7, 7) at 224 input (paper, eq. 6).
    ``densenet-tiny``: the same DenseNet structure (stem, 4 dense blocks, 3
        transitions, norm5) with 2 layers per block, growth rate 16 and 32 stem
        channels: 64 features, ~45k parameters, stride 32. For tests and the CPU demo.
    ``densenet-small``: as tiny with deeper blocks 2-4 (2, 4, 8, 8 layers): 216 features,
        ~215k parameters; the `cxrloc demo` backbone (ours: the extra layers run at low
        resolution, so they cost little; measured in the demo's tuning runs).

``output_stride=16`` (ours, an option for small demo inputs) switches off the
average pooling of the last transition, so g is (B, K, H/16, W/16); ``output_stride=8``
also that of the second transition, (B, K, H/8, W/8) (the demo: a 16 x 16 grid at 128 px).
The parameters and their names are unchanged, so ImageNet weights still load.

Pretrained weights (``pretrained=True``, densenet121 only) come from torchvision's
``DenseNet121_Weights.IMAGENET1K_V1``: the file is looked up in the torch hub cache
(``$TORCH_HOME/hub/checkpoints``) first; only when it is absent and the download
host answers a quick TCP probe (2 s) is it downloaded (set ``CXRLOC_OFFLINE=1`` to
never try). When the weights cannot be obtained the backbone keeps its random
initialisation and one warning says so; it never raises for that reason. An explicit
``weights_path`` is different: a missing or wrong file is an error.
"""

from __future__ import annotations

import logging
import os
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import DenseNet
from torchvision.models.densenet import DenseNet121_Weights

log = logging.getLogger(__name__)

BACKBONES = ("densenet121", "densenet-tiny", "densenet-small")

#: DenseNet hyper-parameters per backbone name (torchvision's DenseNet class builds them).
_DENSENET_SPECS: dict[str, dict] = {
    "densenet121": dict(growth_rate=32, block_config=(6, 12, 24, 16), num_init_features=64, bn_size=4),
    "densenet-tiny": dict(growth_rate=16, block_config=(2, 2, 2, 2), num_init_features=32, bn_size=2),
    "densenet-small": dict(growth_rate=16, block_config=(2, 4, 8, 8), num_init_features=32, bn_size=2),
}

#: Old torchvision checkpoints name dense-layer parts "norm.1", "conv.2", ...; modules now use "norm1".
_LEGACY_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.([12]\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$"
)

#: Reasons already warned about in this process (pretrained fallback warns once per reason).
_warned: set[str] = set()


class BackboneError(ValueError):
    """A backbone name, stride or weights file is invalid."""


class DenseNetBackbone(nn.Module):
    """DenseNet ``features`` followed by ReLU: x (B, 3, H, W) -> g (B, K, H/s, W/s), g >= 0."""

    def __init__(self, features: nn.Sequential, num_features: int, output_stride: int = 32) -> None:
        super().__init__()
        self.features = features
        self.num_features = num_features
        self.output_stride = output_stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.features(x))


def create_backbone(
    name: str,
    pretrained: bool = False,
    weights_path: str | Path | None = None,
    output_stride: int = 32,
) -> tuple[nn.Module, int]:
    """Build a backbone and return ``(module, num_features)``.

    Args:
        name: ``"densenet121"`` or ``"densenet-tiny"``.
        pretrained: load ImageNet weights (densenet121) when they can be obtained; else
            random init with one warning.
        weights_path: a local torchvision DenseNet state_dict to load (takes precedence
            over ``pretrained``); errors name the file.
        output_stride: 32 (paper), 16 (last transition without pooling) or 8 (last two).

    Returns:
        (module mapping (B, 3, H, W) -> (B, K, H/s, W/s), K).
    """
    if name not in _DENSENET_SPECS:
        raise BackboneError(f"unknown backbone {name!r}; expected one of {', '.join(BACKBONES)}")
    if output_stride not in (8, 16, 32):
        raise BackboneError(f"output_stride must be 8, 16 or 32, got {output_stride!r}")
    features = DenseNet(**_DENSENET_SPECS[name]).features
    num_features = features.norm5.num_features
    if weights_path is not None:
        load_densenet_weights(features, weights_path)
    elif pretrained:
        _load_imagenet_weights(name, features)
    if output_stride <= 16:
        features.transition3.pool = nn.Identity()
    if output_stride == 8:
        features.transition2.pool = nn.Identity()
    return DenseNetBackbone(features, num_features, output_stride), num_features


def load_densenet_weights(features: nn.Sequential, path: str | Path) -> None:
    """Load a torchvision DenseNet state_dict file into ``features`` (strict).

    Accepts a plain state_dict or one wrapped as ``{"state_dict": ...}``, keys with or
    without a ``module.`` prefix, legacy ``norm.1``-style layer keys, files without
    BatchNorm ``num_batches_tracked`` counters (as torchvision's ImageNet file), and a
    classifier (ignored). Loaded with ``weights_only=True``.
    """
    path = Path(path)
    if not path.is_file():
        raise BackboneError(f"{path}: weights file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle payload refused by weights_only, ...
        raise BackboneError(f"{path}: cannot read weights ({type(e).__name__}: {e})") from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BackboneError(f"{path}: not a state_dict (expected a mapping of names to tensors)")
    renamed: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        match = _LEGACY_KEY.match(key)
        if match:
            key = match.group(1) + match.group(2)
        if key.startswith("classifier."):
            continue
        renamed[key.removeprefix("features.")] = value
    expected = features.state_dict()
    for key in set(expected) - set(renamed):  # files from before BatchNorm counted batches lack these
        if key.endswith("num_batches_tracked"):
            renamed[key] = expected[key].clone()
    missing = sorted(set(expected) - set(renamed))
    unexpected = sorted(set(renamed) - set(expected))
    shapes = [
        f"{k}: file {tuple(renamed[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in renamed and renamed[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        raise BackboneError(
            f"{path}: weights do not match the DenseNet features "
            f"({len(missing)} missing, {len(unexpected)} unexpected, {len(shapes)} shape mismatches; "
            f"e.g. missing {missing[:3]}, unexpected {unexpected[:3]}, shapes {shapes[:3]})"
        )
    features.load_state_dict(renamed, strict=True)
    log.info("loaded backbone weights from %s", path)


def imagenet_weights_file() -> Path:
    """Where torchvision keeps the DenseNet-121 ImageNet file: ``$TORCH_HOME/hub/checkpoints/<name>``."""
    filename = os.path.basename(urlparse(DenseNet121_Weights.IMAGENET1K_V1.url).path)
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def _load_imagenet_weights(name: str, features: nn.Sequential) -> None:
    if name != "densenet121":
        _warn_once(f"no-imagenet-{name}", f"no ImageNet weights exist for backbone {name!r}; using random init")
        return
    cached = imagenet_weights_file()
    if not cached.is_file():
        url = DenseNet121_Weights.IMAGENET1K_V1.url
        why = _offline_reason(url)
        if why is None:
            try:
                _download_weights(url, cached)
            except Exception as e:  # network errors, hash mismatch, disk full
                why = f"download failed ({type(e).__name__}: {e})"
        if why is not None:
            _warn_once(
                "imagenet-unavailable",
                f"ImageNet weights for densenet121 are not available: {why}. Using RANDOM initialisation. "
                f"Put {cached.name} in {cached.parent} (TORCH_HOME) or set model.weights_path to use them.",
            )
            return
    try:
        load_densenet_weights(features, cached)
    except BackboneError as e:
        _warn_once("imagenet-corrupt", f"cached ImageNet weights unusable ({e}); using RANDOM initialisation")


def _offline_reason(url: str) -> str | None:
    """Why a download cannot happen now (None when it may): CXRLOC_OFFLINE or an unreachable host."""
    if os.environ.get("CXRLOC_OFFLINE", "") not in ("", "0"):
        return "CXRLOC_OFFLINE is set"
    host = urlparse(url).hostname or ""
    if not _network_reachable(host):
        return f"{host} is not reachable (offline?)"
    return None


def _network_reachable(host: str, port: int = 443, timeout: float = 2.0) -> bool:
    """A quick TCP connect to ``host:port``; False on any error or after ``timeout`` seconds."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _download_weights(url: str, dst: Path) -> None:
    """Download ``url`` to ``dst`` (torch writes a temp file and renames it), checking the hash prefix."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    match = re.search(r"-([a-f0-9]+)\.", dst.name)
    log.warning("downloading ImageNet weights %s -> %s", url, dst)
    torch.hub.download_url_to_file(url, str(dst), hash_prefix=match.group(1) if match else None, progress=True)


def _warn_once(key: str, message: str) -> None:
    if key in _warned:
        log.debug(message)
        return
    _warned.add(key)
    log.warning(message)
