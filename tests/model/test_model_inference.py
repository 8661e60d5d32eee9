"""Inference: class-specific region ensemble (eq. 10) and averaged-weight maps (eq. 11) vs direct formulas."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cxrloc.config import ModelConfig
from cxrloc.model import build_model, upsample_maps
from cxrloc.model.dlrv import DLRV


def slow_predict(model: DLRV, g: torch.Tensor, pooling: str) -> tuple[torch.Tensor, ...]:
    """Reference, one image and one class at a time, straight from eq. 6, 8, 10, 11."""
    batch, _, h, w = g.shape
    probs = torch.zeros(batch, model.num_classes, dtype=torch.float64)
    boxes = torch.zeros(batch, model.num_classes, h, w, dtype=torch.bool)
    maps = torch.zeros(batch, model.num_classes, h, w, dtype=torch.float64)
    wg, bg = model.global_head.weight.double(), model.global_head.bias.double()
    v, bv = model.region_head.weight.double(), model.region_head.bias.double()
    for i in range(batch):
        gi = g[i].double()
        f = gi.mean(dim=(1, 2))
        for c in range(model.num_classes):
            cam = (wg[c][:, None, None] * gi).sum(0)  # eq. 6
            norm = (cam - cam.min()) / (cam.max() - cam.min())
            ys, xs = torch.nonzero(norm > model.cam_threshold, as_tuple=True)
            mask = torch.zeros(h, w, dtype=torch.float64)
            mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1] = 1.0
            boxes[i, c] = mask > 0
            masked = gi * mask
            f_region = masked.sum(dim=(1, 2)) / (h * w if pooling == "gap" else mask.sum())
            logit = wg[c] @ f + bg[c] + v[c] @ f_region + bv[c]  # eq. 10
            probs[i, c] = torch.sigmoid(logit)
            m = sum(0.5 * (wg[c, k] + v[c, k]) * gi[k] for k in range(gi.shape[0]))  # eq. 11
            maps[i, c] = (m - m.min()) / (m.max() - m.min())
    return probs, maps, boxes


@pytest.mark.parametrize("pooling", ["gap", "box"])
def test_predict_matches_per_class_formulas(pooling):
    torch.manual_seed(0)
    model = DLRV(nn.Identity(), 9, num_classes=5, rv_pooling=pooling).eval()
    g = torch.rand(3, 9, 7, 7)
    out = model.predict(g)
    probs, maps, boxes = slow_predict(model, g, pooling)
    assert torch.equal(out["region_masks"], boxes)
    torch.testing.assert_close(out["probs"].double(), probs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["cam_grid"].double(), maps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["logits"], model.global_head(g.mean(dim=(2, 3))))
    assert out["cam_grid"].amin() >= 0 and out["cam_grid"].amax() <= 1


def test_without_region_head_scores_and_maps_use_global_only():
    torch.manual_seed(0)
    model = DLRV(nn.Identity(), 6, num_classes=3, use_region=False).eval()
    g = torch.rand(2, 6, 5, 5)
    out = model.predict(g)
    torch.testing.assert_close(out["probs"], torch.sigmoid(out["logits"]))
    cams = torch.einsum("ck,bkhw->bchw", model.global_head.weight, g)
    lo = cams.amin(dim=(2, 3), keepdim=True)
    hi = cams.amax(dim=(2, 3), keepdim=True)
    torch.testing.assert_close(out["cam_grid"], (cams - lo) / (hi - lo), rtol=1e-5, atol=1e-5)


def test_localization_maps_are_bilinear_upsampled_grid_maps():
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="densenet-tiny", pretrained=False)).eval()
    x = torch.randn(2, 3, 64, 64)
    grid = model.predict(x)["cam_grid"]
    maps = model.localization_maps(x, (96, 80))
    assert maps.shape == (2, 14, 96, 80)
    assert maps.min() >= 0 and maps.max() <= 1
    torch.testing.assert_close(maps, F.interpolate(grid, size=(96, 80), mode="bilinear", align_corners=False))
    torch.testing.assert_close(upsample_maps(grid, (96, 80)), maps)


def test_predict_batch_independent_and_no_python_loop_dependence():
    """Images are scored independently: the batch result equals per-image results (eval mode)."""
    torch.manual_seed(1)
    model = build_model(ModelConfig(backbone="densenet-tiny", pretrained=False)).eval()
    x = torch.randn(4, 3, 64, 64)
    batched = model.predict(x)["probs"]
    single = torch.cat([model.predict(x[i : i + 1])["probs"] for i in range(4)])
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-5)


def test_bf16_autocast_keeps_probabilities_close():
    torch.manual_seed(2)
    model = build_model(ModelConfig(backbone="densenet-tiny", pretrained=False)).eval()
    x = torch.randn(2, 3, 64, 64)
    ref = model.predict(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model.predict(x)
    assert low["probs"].dtype == torch.float32
    assert (low["probs"] - ref["probs"]).abs().max() < 0.05


def test_hflip_tta_averages_the_two_views():
    """``predict(x, hflip_tta=True)`` (ours): scores = mean of x and mirrored x; map = both maps aligned, averaged, renormalised."""
    torch.manual_seed(3)
    model = build_model(ModelConfig(backbone="densenet-tiny", pretrained=False, output_stride=16)).eval()
    x = torch.randn(3, 3, 64, 64)
    plain, mirrored = model.predict(x), model.predict(x.flip(-1))
    tta = model.predict(x, hflip_tta=True)
    torch.testing.assert_close(tta["probs"], 0.5 * (plain["probs"] + mirrored["probs"]), atol=1e-5, rtol=0)
    torch.testing.assert_close(tta["logits"], 0.5 * (plain["logits"] + mirrored["logits"]), atol=1e-5, rtol=0)
    avg = 0.5 * (plain["cam_grid"] + mirrored["cam_grid"].flip(-1))
    lo, hi = avg.amin(dim=(-2, -1), keepdim=True), avg.amax(dim=(-2, -1), keepdim=True)
    torch.testing.assert_close(tta["cam_grid"], (avg - lo) / (hi - lo), atol=1e-5, rtol=0)
    assert torch.equal(tta["region_masks"], plain["region_masks"])
    # the TTA prediction of the mirrored image is the mirrored TTA prediction (the offsets' left/right part cancels)
    tta_m = model.predict(x.flip(-1), hflip_tta=True)
    torch.testing.assert_close(tta_m["probs"], tta["probs"], atol=1e-5, rtol=0)
    torch.testing.assert_close(tta_m["cam_grid"], tta["cam_grid"].flip(-1), atol=1e-5, rtol=0)
    assert not torch.allclose(plain["cam_grid"], tta["cam_grid"], atol=1e-3)  # it does change the maps


def test_lse_pool_between_mean_and_max():
    from cxrloc.model.dlrv import lse_pool

    torch.manual_seed(0)
    maps = torch.randn(2, 3, 5, 7, dtype=torch.float64)
    r = 4.0
    direct = torch.log(torch.exp(r * maps).mean(dim=(-2, -1))) / r
    torch.testing.assert_close(lse_pool(maps, r), direct)
    torch.testing.assert_close(lse_pool(maps, 1e-6), maps.mean(dim=(-2, -1)), atol=1e-5, rtol=0)
    torch.testing.assert_close(lse_pool(maps, 1e4), maps.amax(dim=(-2, -1)), atol=1e-3, rtol=0)
    assert torch.isfinite(lse_pool(1e4 * maps, 10.0)).all()  # stable for large maps


def test_global_pooling_lse_scores_the_class_maps():
    """``model.global_pooling: lse`` (ours): logit_c = LSE_r over the cells of M_c (eq. 6) + b_c, in training
    and at inference; ``gap`` (paper) stays W_G GAP(g) + b."""
    torch.manual_seed(1)
    cfg = ModelConfig(backbone="densenet-tiny", pretrained=False, output_stride=16, global_pooling="lse", lse_r=5.0)
    model = build_model(cfg).eval()
    x = torch.randn(2, 3, 64, 64)
    g = model.forward_features(x)
    cams = torch.einsum("ck,bkhw->bchw", model.global_head.weight, g)
    expected = torch.log(torch.exp(5.0 * cams).mean(dim=(-2, -1))) / 5.0 + model.global_head.bias
    torch.testing.assert_close(model(x)["logits"], expected, atol=1e-4, rtol=1e-4)
    pred = model.predict(x)
    torch.testing.assert_close(pred["logits"], expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(pred["probs"], torch.sigmoid(expected + pred["region_logits"]), atol=1e-5, rtol=0)
    gap = build_model(ModelConfig(backbone="densenet-tiny", pretrained=False, output_stride=16)).eval()
    gap.load_state_dict(model.state_dict())  # same parameters: only the pooling differs
    torch.testing.assert_close(gap(x)["logits"], gap.global_head(g.mean(dim=(2, 3))))
    assert not torch.allclose(gap(x)["logits"], model(x)["logits"], atol=1e-3)
    with pytest.raises(ValueError, match="global_pooling"):
        DLRV(nn.Identity(), 4, global_pooling="max")
    with pytest.raises(ValueError, match="lse_r"):
        DLRV(nn.Identity(), 4, global_pooling="lse", lse_r=0.0)
