"""The DLRV model: backbone, global classifier W_G, region classifier W_RV (Zhang et al., BMVC 2020).

Shapes: B images, K features (1024 for DenseNet-121), C = 14 classes, g (B, K, h, w)
with h = w = 7 at 224 input.

Training (``forward``):
    f(x)  = mean over (h, w) of g                                       (B, K)
    logit = W_G f(x) + b                                                (eq. 1)
    M_c   = sum_k w_c^k g_k            (class CAMs, one einsum)          (eq. 6)
    M     = sum_c 1[y_c = 1] M_c       (attentive map of the labels)    (eq. 7)
    M is min-max normalised over its h*w cells, cells > cam_threshold (0.8) are
    found, the smallest rectangle of cells holding all of them is the box, g is
    zeroed outside the box and pooled to f'(x); region logit = W_RV f'(x) + b' (eq. 8).

Inference (``predict``):
    class-specific regions: the box of class c comes from its own normalised M_c,
    so f'_c differs per class; p_c = sigmoid(logit_c + v_c . f'_c + b'_c)  (eq. 10).
    Localization map M_c = sum_k (w_c^k + v_c^k) / 2 g_k, min-max normalised per
    (image, class), bilinear upsampling on request                      (eq. 11).

Decisions (ours, METHOD.md):
    * The mask is computed from DETACHED features and W_G: L_RV trains the backbone
      and W_RV through the masked features only; no gradient flows through the box.
    * An image without positive labels (No Finding) and a constant map (max - min
      <= eps * max|M|, eps = float32 machine epsilon) keep the whole map.
    * Pooling ``"gap"`` (paper-literal) divides the masked sum by h*w; ``"box"``
      divides by the number of cells in the box.
    * CAMs used for boxes are computed in float32 even under autocast, so bf16
      inference does not move the boxes.
    * ``normalize_embeddings`` L2-normalises only the ``embedding`` used by the
      triplet loss; the classifiers always see the raw pooled features (eq. 1).
    * ``use_region=False`` (models trained without RV, whose W_RV is untrained):
      ``predict`` scores with the global logits only and the map uses W_G only.
    * ``global_pooling="lse"`` (ours, off by default): the global logit of class c is the
      log-sum-exp pooling of its map, (1/r) log mean_ab exp(r M_c(a, b)) + b_c, instead of
      M_c's mean (= W_G GAP(g) + b, eq. 1). It rewards maps that peak on the evidence (the
      demo's small findings). The embedding for the triplet loss stays GAP(g).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from cxrloc.config import ModelConfig
from cxrloc.labels import NUM_FINDINGS
from cxrloc.model.backbone import create_backbone

Pooling = Literal["gap", "box"]
GlobalPooling = Literal["gap", "lse"]


# --------------------------------------------------------------------------- pure functions


def class_cams(g: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Class activation maps M_c = sum_k weight[c, k] g_k for all classes at once (eq. 6).

    Computed in float32 with autocast off (the maps decide boxes).

    Args:
        g: feature map (B, K, h, w).
        weight: classifier weights (C, K).

    Returns:
        (B, C, h, w) float32.
    """
    with torch.autocast(device_type=g.device.type, enabled=False):
        return torch.einsum("ck,bkhw->bchw", weight.float(), g.float())


def lse_pool(maps: torch.Tensor, r: float) -> torch.Tensor:
    """Log-sum-exp pooling over the last two dims: (1/r) log mean exp(r * maps); (..., h, w) -> (...).

    Between the mean (r -> 0) and the max (r -> inf); computed stably with ``logsumexp``.
    """
    cells = maps.shape[-1] * maps.shape[-2]
    return (torch.logsumexp(r * maps.flatten(-2), dim=-1) - math.log(cells)) / r


def normalize_maps(maps: torch.Tensor) -> torch.Tensor:
    """Min-max normalise each map over its last two dims to [0, 1]; constant maps become 0.

    Args:
        maps: (..., h, w).

    Returns:
        (..., h, w) same dtype, values in [0, 1].
    """
    lo = maps.amin(dim=(-2, -1), keepdim=True)
    hi = maps.amax(dim=(-2, -1), keepdim=True)
    span = hi - lo
    constant = _is_constant(lo, hi)
    out = (maps - lo) / torch.where(constant, torch.ones_like(span), span)
    return torch.where(constant, torch.zeros_like(out), out)


def region_mask(maps: torch.Tensor, threshold: float) -> torch.Tensor:
    """Box masks from activation maps (eq. 8's region; METHOD.md).

    Each map is min-max normalised; the box is the smallest rectangle of grid cells
    that holds every cell with normalised value > ``threshold``. A constant map (or
    one without any cell over the threshold, e.g. non-finite) keeps the whole map.

    Args:
        maps: (..., h, w) activation maps (not necessarily normalised).
        threshold: in (0, 1), the paper's 0.8.

    Returns:
        (..., h, w) bool, True inside the box.
    """
    lo = maps.amin(dim=(-2, -1), keepdim=True)
    hi = maps.amax(dim=(-2, -1), keepdim=True)
    constant = _is_constant(lo, hi)
    norm = (maps - lo) / torch.where(constant, torch.ones_like(hi), hi - lo)
    hot = (norm > threshold) & ~constant
    rows = _span_between_first_and_last(hot.any(dim=-1))  # (..., h)
    cols = _span_between_first_and_last(hot.any(dim=-2))  # (..., w)
    mask = rows.unsqueeze(-1) & cols.unsqueeze(-2)
    keep_all = constant | ~hot.any(dim=-1, keepdim=True).any(dim=-2, keepdim=True)
    return mask | keep_all


def attentive_region_mask(
    g: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, threshold: float
) -> torch.Tensor:
    """Box mask from the attentive map of each image's positive labels (eq. 6-7), detached.

    M = sum_c 1[y_c = 1] M_c = sum_k (sum_c y_c w_c^k) g_k, computed as one weighted
    sum. Images without a positive label (No Finding) keep the whole map.

    Args:
        g: (R, K, h, w) features (detached here).
        weight: W_G weights (C, K) (detached here).
        labels: (R, C) multi-hot; values > 0 count as positive.
        threshold: cam threshold (0.8).

    Returns:
        (R, h, w) bool.
    """
    with torch.no_grad():
        positive = (labels > 0).float()
        with torch.autocast(device_type=g.device.type, enabled=False):  # fp32 even under bf16/fp16 autocast
            per_image_weight = positive @ weight.detach().float()  # (R, K)
            attentive = torch.einsum("rk,rkhw->rhw", per_image_weight, g.detach().float())
        mask = region_mask(attentive, threshold)
        no_finding = positive.sum(dim=1) == 0
        return mask | no_finding[:, None, None]


def masked_pool(g: torch.Tensor, mask: torch.Tensor, pooling: Pooling = "gap") -> torch.Tensor:
    """Pool g with everything outside the box zeroed: f'(x) (eq. 8).

    Args:
        g: (R, K, h, w).
        mask: (R, h, w) bool.
        pooling: ``"gap"``: sum over the box / (h*w) (paper-literal GAP of the zeroed
            map); ``"box"``: mean over the box cells.

    Returns:
        (R, K).
    """
    weights = mask.to(g.dtype)
    summed = torch.einsum("rkhw,rhw->rk", g, weights)
    return summed / _pool_denominator(weights, pooling).unsqueeze(-1)


def merge_hflip(out: dict[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
    """Merge :meth:`DLRV.predict_from_features` outputs of [x; hflip(x)] (2n rows) into n rows.

    Scores: mean of the two views. Maps: the flipped view's ``cam_grid`` flipped back, averaged
    with the plain one and min-max normalised again. ``region_masks``: the plain view's.
    """
    merged = {k: 0.5 * (out[k][:n] + out[k][n:]) for k in ("probs", "logits", "region_logits")}
    merged["cam_grid"] = normalize_maps(0.5 * (out["cam_grid"][:n] + out["cam_grid"][n:].flip(-1)))
    merged["region_masks"] = out["region_masks"][:n]
    return merged


def upsample_maps(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling of [0, 1] maps (B, C, h, w) -> (B, C, H, W), clamped to [0, 1] (eq. 11)."""
    out = F.interpolate(maps.float(), size=tuple(size), mode="bilinear", align_corners=False)
    return out.clamp_(0.0, 1.0)


def _pool_denominator(weights: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """(...,) divisor for masks (..., h, w): h*w for "gap", the box area for "box"."""
    if pooling == "gap":
        return torch.full(weights.shape[:-2], weights.shape[-2] * weights.shape[-1], dtype=weights.dtype,
                          device=weights.device)
    if pooling == "box":
        return weights.sum(dim=(-2, -1)).clamp_min(1.0)
    raise ValueError(f"rv_pooling must be 'gap' or 'box', got {pooling!r}")


def _is_constant(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    eps = torch.finfo(torch.float32).eps
    scale = torch.maximum(hi.abs(), lo.abs())
    return (hi - lo) <= eps * scale


def _span_between_first_and_last(flags: torch.Tensor) -> torch.Tensor:
    """(..., n) bool -> True from the first to the last True along the last dim (inclusive)."""
    ints = flags.to(torch.int32)
    after_first = ints.cumsum(dim=-1) > 0
    before_last = ints.flip(-1).cumsum(dim=-1).flip(-1) > 0
    return after_first & before_last


# --------------------------------------------------------------------------- module


class DLRV(nn.Module):
    """Backbone + global classifier W_G + region classifier W_RV.

    Args:
        backbone: module x (B, 3, H, W) -> g (B, K, h, w).
        num_features: K.
        num_classes: C (14).
        cam_threshold: threshold on normalised maps for the region box (paper: 0.8).
        rv_pooling: ``"gap"`` (paper-literal) or ``"box"``.
        normalize_embeddings: L2-normalise the triplet embedding (ours: off).
        use_region: add the region logits at inference and use the averaged weights in
            the map (eq. 10-11); False for models trained without RV.
        global_pooling: ``"gap"`` (paper, eq. 1) or ``"lse"`` (ours) for the global logits.
        lse_r: the sharpness r of ``"lse"``.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_features: int,
        num_classes: int = NUM_FINDINGS,
        cam_threshold: float = 0.8,
        rv_pooling: Pooling = "gap",
        normalize_embeddings: bool = False,
        use_region: bool = True,
        global_pooling: GlobalPooling = "gap",
        lse_r: float = 10.0,
    ) -> None:
        super().__init__()
        if not 0.0 < cam_threshold < 1.0:
            raise ValueError(f"cam_threshold must be in (0, 1), got {cam_threshold}")
        if rv_pooling not in ("gap", "box"):
            raise ValueError(f"rv_pooling must be 'gap' or 'box', got {rv_pooling!r}")
        if global_pooling not in ("gap", "lse"):
            raise ValueError(f"global_pooling must be 'gap' or 'lse', got {global_pooling!r}")
        if not lse_r > 0.0:
            raise ValueError(f"lse_r must be > 0, got {lse_r}")
        self.backbone = backbone
        self.num_features = num_features
        self.num_classes = num_classes
        self.cam_threshold = cam_threshold
        self.rv_pooling: Pooling = rv_pooling
        self.normalize_embeddings = normalize_embeddings
        self.use_region = use_region
        self.global_pooling: GlobalPooling = global_pooling
        self.lse_r = float(lse_r)
        self.global_head = nn.Linear(num_features, num_classes)  # W_G, b (eq. 1)
        self.region_head = nn.Linear(num_features, num_classes)  # W_RV, b' (eq. 8), random init

    # ----------------------------------------------------------------- training path

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) -> g (B, K, h, w)."""
        if x.ndim != 4:
            raise ValueError(f"expected images (B, 3, H, W), got shape {tuple(x.shape)}")
        return self.backbone(x)

    def global_logits(self, g: torch.Tensor, pooled: torch.Tensor, cams: torch.Tensor | None = None) -> torch.Tensor:
        """Global logits (B, C): W_G GAP(g) + b (eq. 1), or LSE pooling of the class maps (``"lse"``).

        ``cams``: the W_G class maps of g when the caller has them already (``"lse"`` only).
        """
        if self.global_pooling == "gap":
            return self.global_head(pooled)
        cams = class_cams(g, self.global_head.weight) if cams is None else cams
        return lse_pool(cams, self.lse_r) + self.global_head.bias.float()

    def forward_head(self, g: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Heads on a feature map; see :meth:`forward`."""
        pooled = g.mean(dim=(2, 3))
        out = {
            "features": g,
            "embedding": F.normalize(pooled, dim=1) if self.normalize_embeddings else pooled,
            "logits": self.global_logits(g, pooled),
        }
        if labels is not None:
            rows = labels.shape[0]
            if labels.ndim != 2 or labels.shape[1] != self.num_classes or rows > g.shape[0]:
                raise ValueError(
                    f"labels must be (R, {self.num_classes}) with R <= batch {g.shape[0]}, got {tuple(labels.shape)}"
                )
            mask = attentive_region_mask(g[:rows], self.global_head.weight, labels, self.cam_threshold)
            region_features = masked_pool(g[:rows], mask, self.rv_pooling)
            out["region_mask"] = mask
            out["region_logits"] = self.region_head(region_features)
        return out

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """One backbone pass; region logits for the first ``labels.shape[0]`` rows.

        Args:
            x: images (B, 3, H, W); with distance learning B = 3N as [anchors; positives; negatives].
            labels: optional (R, C) multi-hot labels of the first R <= B rows (the anchors, or
                all rows); region verification (eq. 6-8) runs on those rows only. None: skip RV.

        Returns:
            dict with ``features`` g (B, K, h, w), ``embedding`` (B, K) (L2-normalised when
            configured), ``logits`` (B, C) (eq. 1); with labels also ``region_logits`` (R, C)
            (eq. 8) and ``region_mask`` (R, h, w) bool.
        """
        return self.forward_head(self.forward_features(x), labels)

    # ----------------------------------------------------------------- inference path

    def predict_from_features(self, g: torch.Tensor) -> dict[str, torch.Tensor]:
        """Inference heads on g (B, K, h, w); see :meth:`predict`."""
        cams_global = class_cams(g, self.global_head.weight)  # (B, C, h, w), eq. 6
        logits = self.global_logits(g, g.mean(dim=(2, 3)), cams_global).float()
        cams_region = class_cams(g, self.region_head.weight)
        boxes = region_mask(cams_global, self.cam_threshold)  # class-specific regions (B, C, h, w)
        masks = boxes.float()
        # v_c . f'_c = sum_hw (v_c . g)(a, b) mask_c(a, b) / denominator
        region_logits = (cams_region * masks).sum(dim=(2, 3)) / _pool_denominator(masks, self.rv_pooling)
        region_logits = region_logits + self.region_head.bias.float()
        if self.use_region:
            total = logits + region_logits  # eq. 10
            cam = 0.5 * (cams_global + cams_region)  # eq. 11 (linear in the weights)
        else:
            total = logits
            cam = cams_global
        return {
            "probs": torch.sigmoid(total),
            "logits": logits,
            "region_logits": region_logits,
            "cam_grid": normalize_maps(cam),
            "region_masks": boxes,
        }

    def predict(self, x: torch.Tensor, hflip_tta: bool = False) -> dict[str, torch.Tensor]:
        """Scores and maps without labels (runs under ``torch.inference_mode``; call ``eval()`` first).

        Args:
            x: images (B, 3, H, W).
            hflip_tta: also run the horizontally flipped images (one batch of 2B) and average:
                probabilities and logits are the mean of the two views; the map is the mean of
                the two normalised eq. 11 maps (the flipped one flipped back), normalised again;
                ``region_masks`` are the unflipped view's. Ours (not in the paper): it cancels
                the left/right part of the offsets a CAM learns (docs/demo_tuning.md).

        Returns:
            ``probs`` (B, C) = sigmoid(global + class-specific region logits) (eq. 10; global
            only when ``use_region`` is False), ``logits`` (B, C) global, ``region_logits``
            (B, C), ``cam_grid`` (B, C, h, w) eq. 11 maps min-max normalised to [0, 1] (float32),
            ``region_masks`` (B, C, h, w) bool, the class-specific boxes of eq. 10.

        Note: under bf16 autocast the global logits stay within ~0.005 in probability, but
        cells near the 0.8 threshold can move a class box by a grid row, which jumps that
        class's region logit (benchmarks/model.py measured max |dp| ~0.09 on a barely trained
        model); use fp32 (channels_last, optionally torch.compile) for exact eq. 10 scores.
        """
        with torch.inference_mode():
            return self.predict_traceable(x, hflip_tta)

    def predict_traceable(self, x: torch.Tensor, hflip_tta: bool = False) -> dict[str, torch.Tensor]:
        """:meth:`predict` without ``torch.inference_mode``, so that torch.export / ONNX can trace it."""
        if not hflip_tta:
            return self.predict_from_features(self.forward_features(x))
        both = self.predict_from_features(self.forward_features(torch.cat([x, x.flip(-1)])))
        return merge_hflip(both, x.shape[0])

    def localization_maps(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Eq. 11 maps for all classes, normalised on the grid, bilinearly upsampled: (B, C, H, W) in [0, 1]."""
        return upsample_maps(self.predict(x)["cam_grid"], size)


def build_model(model_cfg: ModelConfig, num_classes: int = NUM_FINDINGS, use_region: bool = True) -> DLRV:
    """Build a :class:`DLRV` from the model config.

    Args:
        model_cfg: backbone, pretrained / weights_path, output_stride, cam_threshold,
            rv_pooling, normalize_embeddings, global_pooling, lse_r.
        num_classes: C (14).
        use_region: pass ``cfg.loss.use_rv``: a model trained without RV scores and maps
            with W_G only at inference (its W_RV is untrained).
    """
    backbone, num_features = create_backbone(
        model_cfg.backbone,
        pretrained=model_cfg.pretrained,
        weights_path=model_cfg.weights_path,
        output_stride=model_cfg.output_stride,
    )
    return DLRV(
        backbone,
        num_features,
        num_classes=num_classes,
        cam_threshold=model_cfg.cam_threshold,
        rv_pooling=model_cfg.rv_pooling,
        normalize_embeddings=model_cfg.normalize_embeddings,
        use_region=use_region,
        global_pooling=model_cfg.global_pooling,
        lse_r=model_cfg.lse_r,
    )
