"""Model input transforms (METHOD.md data protocol): resize S -> 224, 3 channels, ImageNet normalisation;
in training a random rotation within +-``rotation_degrees`` and a horizontal flip with ``hflip_prob``
(paper), and optionally (ours, off by default) a random zoom by a factor in ``1 +- scale_range``, a
shift by up to ``translate_fraction`` of the image side and a vertical flip with ``vflip_prob``.

One implementation serves both paths:

- :func:`batch_transform` works on a whole uint8 batch ``(B, S, S)`` on any device
  (the training engine calls it on the GPU after the DataLoader hands over raw
  cache rows: METHOD's augmentation "on the batch tensor where that is faster").
  Resize, rotation and flip are one ``grid_sample`` per batch, with per-sample
  parameters drawn from a ``torch.Generator``.
- :class:`SampleTransform` applies the same function to one ``(S, S)`` image
  (a batch of one), for DataLoader workers and for prediction on single files.

Resampling (ours): from the cache (S = 256 -> 224, a factor of 1.14) the resize,
the rotation about the centre and the flip are a single bilinear resampling
(black outside the image), the same in training and evaluation (there with angle
0, i.e. a plain bilinear resize): one interpolation blurs less than two, and at
this factor bilinear sampling needs no extra antialiasing (the cache itself was
made with an antialiased Lanczos filter). A source more than
:data:`DIRECT_RESAMPLE_MAX_SCALE` times larger than the output (e.g. a 1024 px
original at prediction time) is first resized with an antialiased bilinear filter.
Normalisation comes last.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cxrloc.config import DataConfig

#: A source more than this many times larger than the output is first resized with an antialiased
#: filter; up to it, resize + rotation + flip are one bilinear resampling (ours, see the module doc).
DIRECT_RESAMPLE_MAX_SCALE = 1.5


def augment_params(
    batch: int,
    cfg: DataConfig,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random training augmentation parameters, drawn on the CPU.

    Returns:
        angles (B,) float32 degrees, uniform in [-rotation_degrees, +rotation_degrees];
        flips (B,) bool, True with probability ``hflip_prob``.
    """
    u = torch.rand(batch, generator=generator)
    angles = (2.0 * u - 1.0) * float(cfg.rotation_degrees)
    flips = torch.rand(batch, generator=generator) < float(cfg.hflip_prob)
    return angles.float(), flips


def augment_zoom_shift(
    batch: int,
    cfg: DataConfig,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
    """The optional zoom / shift parameters (ours; ``(None, None)`` when both are off, so the paper's
    augmentation draws exactly the same random numbers as without this option).

    Returns:
        zooms (B,) float32 in [1 - scale_range, 1 + scale_range] (> 1 magnifies the content);
        shifts (B, 2) float32 (x, y) in normalised coordinates, each in +-2 * translate_fraction
        (a fraction of the image side: the normalised image spans 2).
    """
    s, t = float(cfg.scale_range), float(cfg.translate_fraction)
    if s == 0.0 and t == 0.0:
        return None, None
    zooms = 1.0 + (2.0 * torch.rand(batch, generator=generator) - 1.0) * s
    shifts = (2.0 * torch.rand(batch, 2, generator=generator) - 1.0) * (2.0 * t)
    return zooms.float(), shifts.float()


def augment_vflip(batch: int, cfg: DataConfig, generator: torch.Generator | None = None) -> torch.Tensor | None:
    """Vertical flips (ours, off by default: ``None`` and no random draw when ``vflip_prob`` is 0).

    Why it exists: a CAM network trained from scratch with horizontal flips only learns class maps
    whose peak sits a constant distance above or below the finding (the demo's Nodule maps peaked
    15 px below 11 px nodules; docs/demo_tuning.md); flipping vertically too makes that offset
    average out, as the horizontal flip already does for left/right.
    """
    p = float(cfg.vflip_prob)
    if p == 0.0:
        return None
    return torch.rand(batch, generator=generator) < p


def batch_transform(
    images: torch.Tensor,
    cfg: DataConfig,
    train: bool = False,
    generator: torch.Generator | None = None,
    angles: torch.Tensor | None = None,
    flips: torch.Tensor | None = None,
    zooms: torch.Tensor | None = None,
    shifts: torch.Tensor | None = None,
    vflips: torch.Tensor | None = None,
) -> torch.Tensor:
    """uint8 batch -> normalised float model input.

    Args:
        images: (B, S, S) or (B, 1, S, S) uint8 (or float in [0, 1]) on any device.
        cfg: image_size, rotation_degrees, hflip_prob, scale_range, translate_fraction, vflip_prob, mean, std.
        train: draw random rotation + flip (+ zoom / shift / vertical flip when configured) per sample
            (ignored when any of the explicit parameters below is given).
        generator: CPU generator for the random parameters (default: torch's global one).
        angles: (B,) degrees, counter-clockwise, explicit instead of random.
        flips: (B,) bool, explicit horizontal flips instead of random.
        zooms: (B,) explicit zoom factors (> 1 magnifies), shifts: (B, 2) explicit (x, y) shifts in
            normalised coordinates (see :func:`augment_zoom_shift`); vflips: (B,) bool vertical flips.

    Returns:
        (B, 3, H, H) float32, H = ``cfg.image_size``, channel c = (x - mean[c]) / std[c].
    """
    x = images if images.dim() == 4 else images.unsqueeze(1)
    if x.dim() != 4 or x.shape[1] != 1:
        raise ValueError(f"images must be (B, S, S) or (B, 1, S, S), got {tuple(images.shape)}")
    # uint8 stays in 0..255 until the final affine step, which folds in the 1/255 (one pass fewer)
    unit = 255.0 if images.dtype == torch.uint8 else 1.0
    x = x.float()
    size = int(cfg.image_size)
    if max(x.shape[-2:]) > DIRECT_RESAMPLE_MAX_SCALE * size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    if train and all(v is None for v in (angles, flips, zooms, shifts, vflips)):
        angles, flips = augment_params(x.shape[0], cfg, generator)
        zooms, shifts = augment_zoom_shift(x.shape[0], cfg, generator)
        vflips = augment_vflip(x.shape[0], cfg, generator)
    x = _resample(x, size, angles, flips, zooms, shifts, vflips)
    scale = 1.0 / (unit * torch.tensor(cfg.std, dtype=torch.float64))
    shift = -torch.tensor(cfg.mean, dtype=torch.float64) / torch.tensor(cfg.std, dtype=torch.float64)
    # (x - mean_c) / std_c for c = 0..2 in one broadcasting pass: (B, 1, H, W) -> (B, 3, H, W)
    return torch.addcmul(shift.to(x).view(1, 3, 1, 1), x, scale.to(x).view(1, 3, 1, 1))


def _resample(
    x: torch.Tensor,
    size: int,
    angles: torch.Tensor | None,
    flips: torch.Tensor | None,
    zooms: torch.Tensor | None = None,
    shifts: torch.Tensor | None = None,
    vflips: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, 1, h, w) -> (B, 1, size, size): bilinear resize, rotation by ``angles`` degrees (counter-clockwise,
    about the centre), horizontal flip where ``flips``, vertical flip where ``vflips``, zoom by ``zooms`` and
    shift by ``shifts``, as one resampling.

    The sampling grid maps output to input coordinates: in = R (F out) / z + s, R = [[cos, -sin], [sin, cos]],
    F = diag(+-1, +-1) with -1 for a flipped axis (normalised coordinates, y pointing down, align_corners=False).
    """
    b = x.shape[0]
    a = torch.zeros(b) if angles is None else angles.detach().float().cpu().reshape(b)
    f = torch.zeros(b, dtype=torch.bool) if flips is None else flips.detach().bool().cpu().reshape(b)
    z = torch.ones(b) if zooms is None else zooms.detach().float().cpu().reshape(b)
    t = torch.zeros(b, 2) if shifts is None else shifts.detach().float().cpu().reshape(b, 2)
    v = torch.zeros(b, dtype=torch.bool) if vflips is None else vflips.detach().bool().cpu().reshape(b)
    if not (torch.any(a != 0) or torch.any(z != 1) or torch.any(t != 0) or torch.any(v)):
        # no rotation, zoom, shift or vertical flip: plain bilinear resize (same as the identity grid), exact flips
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=False, align_corners=False)
        return torch.where(f.to(x.device).view(b, 1, 1, 1), x.flip(-1), x) if torch.any(f) else x
    rad = a * (math.pi / 180.0)
    dev, dt = x.device, x.dtype
    cos, sin = torch.cos(rad).to(dev, dt).view(b, 1, 1), torch.sin(rad).to(dev, dt).view(b, 1, 1)
    sign = torch.where(f, -1.0, 1.0).to(dev, dt).view(b, 1, 1)
    sign_y = torch.where(v, -1.0, 1.0).to(dev, dt).view(b, 1, 1)
    inv_zoom = (1.0 / z).to(dev, dt).view(b, 1, 1)
    cos, sin = cos * inv_zoom, sin * inv_zoom
    tx, ty = t[:, 0].to(dev, dt).view(b, 1, 1), t[:, 1].to(dev, dt).view(b, 1, 1)
    # normalised output pixel centres (align_corners=False), as F.affine_grid builds them
    xs = ((torch.arange(size, device=dev, dtype=dt) * 2 + 1) / size - 1).view(1, 1, size)
    ys = xs.view(1, size, 1)
    # the image y axis points down, so this turns the content counter-clockwise on screen (as
    # torchvision's rotate does). Each coordinate is a row term plus a column term, written straight
    # into the grid: several times faster on the CPU than F.affine_grid.
    grid = torch.empty(b, size, size, 2, device=dev, dtype=dt)
    ys = sign_y * ys  # (B, size, 1): the vertical flip
    torch.add(cos * sign * xs, tx - sin * ys, out=grid[..., 0])
    torch.add(sin * sign * xs, ty + cos * ys, out=grid[..., 1])
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class SampleTransform:
    """Per-sample transform: (S, S) uint8 numpy/tensor -> (3, H, H) float32 (see :func:`batch_transform`).

    Args:
        cfg: the data config (image_size, rotation_degrees, hflip_prob, mean, std).
        train: random rotation and flip (torch's global RNG, which DataLoader seeds per worker).
    """

    def __init__(self, cfg: DataConfig | None = None, train: bool = False):
        self.cfg = cfg or DataConfig()
        self.train = train

    def __call__(self, image: np.ndarray | torch.Tensor) -> torch.Tensor:
        if isinstance(image, np.ndarray):  # a read-only memmap row is copied (64 KB at S = 256)
            image = np.ascontiguousarray(image) if image.flags.writeable else np.array(image)
        t = torch.from_numpy(image) if isinstance(image, np.ndarray) else image
        if t.dim() != 2:
            raise ValueError(f"expected one (H, W) grayscale image, got shape {tuple(t.shape)}")
        return batch_transform(t.unsqueeze(0), self.cfg, train=self.train)[0]

    def __repr__(self) -> str:
        return f"SampleTransform(train={self.train}, image_size={self.cfg.image_size})"


def train_transform(cfg: DataConfig | None = None) -> SampleTransform:
    """Training transform: resize, random rotation +-rotation_degrees, hflip p=hflip_prob, normalise."""
    return SampleTransform(cfg, train=True)


def eval_transform(cfg: DataConfig | None = None) -> SampleTransform:
    """Evaluation / prediction transform: resize and normalise only."""
    return SampleTransform(cfg, train=False)


def load_model_input(path: str | Path, cfg: DataConfig | None = None, cache_size: int = 256) -> tuple[torch.Tensor, tuple[int, int]]:
    """A raw image file -> evaluation input, through exactly the steps a cached image takes.

    Decode to grayscale, Lanczos resize to ``cache_size`` (as ``cxrloc prepare`` does), then
    :func:`eval_transform`. Prediction on new files should use this (with the cache size the
    model was trained on) so that it sees the same resampling as in training.

    Returns:
        ``(x, (width, height))``: x (3, H, H) float32 and the original image size (for boxes in pixels).
    """
    from cxrloc.data.io import read_image_resized

    image, orig_size = read_image_resized(path, cache_size)
    return eval_transform(cfg)(image), orig_size

