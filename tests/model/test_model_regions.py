"""Region verification (eq. 6-8): CAMs, attentive map, box, masking and pooling against hand computations."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cxrloc.model.dlrv import (
    DLRV,
    attentive_region_mask,
    class_cams,
    masked_pool,
    normalize_maps,
    region_mask,
)


def feature_model(num_features: int = 5, num_classes: int = 4, **kwargs) -> DLRV:
    """A DLRV whose backbone is the identity: inputs are feature maps g (B, K, h, w)."""
    torch.manual_seed(0)
    return DLRV(nn.Identity(), num_features, num_classes=num_classes, **kwargs)


def test_gap_linear_identity():
    """mean over positions of M_c plus b_c equals the global logit (eq. 1 and 6)."""
    model = feature_model(num_features=7, num_classes=14)
    g = torch.rand(3, 7, 5, 6, dtype=torch.float64)
    model = model.double()
    out = model(g)
    cams = class_cams(g, model.global_head.weight).double()
    assert cams.shape == (3, 14, 5, 6)
    torch.testing.assert_close(cams.mean(dim=(2, 3)) + model.global_head.bias, out["logits"])


def test_class_cams_match_per_class_sum():
    g = torch.randn(2, 6, 4, 4)
    weight = torch.randn(3, 6)
    expected = torch.stack([sum(weight[c, k] * g[:, k] for k in range(6)) for c in range(3)], dim=1)
    torch.testing.assert_close(class_cams(g, weight), expected, rtol=1e-5, atol=1e-5)


def hot_block_features(h: int = 7, w: int = 7, rows=(2, 4), cols=(1, 3)) -> torch.Tensor:
    """(1, 2, h, w): channel 0 is low noise with a hot block, channel 1 is uniform noise."""
    gen = torch.Generator().manual_seed(1)
    g = torch.rand(1, 2, h, w, generator=gen) * 0.1
    g[0, 0, rows[0] : rows[1] + 1, cols[0] : cols[1] + 1] = 5.0
    return g


def test_hot_block_gives_exactly_its_box():
    g = hot_block_features(rows=(2, 4), cols=(1, 3))
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # class 0 looks at channel 0
    labels = torch.tensor([[1.0, 0.0]])
    mask = attentive_region_mask(g, weight, labels, 0.8)
    expected = torch.zeros(1, 7, 7, dtype=torch.bool)
    expected[0, 2:5, 1:4] = True
    assert torch.equal(mask, expected)


def test_box_is_smallest_rectangle_around_scattered_hot_cells():
    maps = torch.zeros(1, 6, 8)
    maps[0, 1, 6] = 1.0  # two hot cells far apart -> rectangle rows 1..4, cols 2..6
    maps[0, 4, 2] = 0.95
    maps[0, 3, 3] = 0.5  # not over 0.8 after normalisation
    mask = region_mask(maps, 0.8)
    expected = torch.zeros(1, 6, 8, dtype=torch.bool)
    expected[0, 1:5, 2:7] = True
    assert torch.equal(mask, expected)


def test_threshold_is_strictly_greater_than():
    maps = torch.tensor([[[0.0, 0.8, 1.0]]])  # normalised: 0, 0.8, 1 -> only the last cell > 0.8
    assert region_mask(maps, 0.8).tolist() == [[[False, False, True]]]


def test_region_mask_vectorised_matches_loop(rng):
    maps = torch.from_numpy(rng.normal(size=(4, 3, 7, 7))).float()
    masks = region_mask(maps, 0.6)
    for b in range(4):
        for c in range(3):
            m = maps[b, c]
            norm = (m - m.min()) / (m.max() - m.min())
            ys, xs = torch.nonzero(norm > 0.6, as_tuple=True)
            ref = torch.zeros(7, 7, dtype=torch.bool)
            ref[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1] = True
            assert torch.equal(masks[b, c], ref)


def test_attentive_map_sums_positive_label_cams():
    """eq. 7: the mask is that of sum_c 1[y_c=1] M_c (checked against the explicit sum)."""
    torch.manual_seed(3)
    g = torch.rand(3, 6, 7, 7)
    weight = torch.randn(4, 6)
    labels = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.float32)
    got = attentive_region_mask(g, weight, labels, 0.8)
    cams = class_cams(g, weight)
    for i in range(3):
        attentive = sum(cams[i, c] for c in range(4) if labels[i, c] == 1)
        assert torch.equal(got[i], region_mask(attentive[None], 0.8)[0])


def test_no_finding_and_constant_maps_keep_whole_map():
    g = hot_block_features()
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    no_finding = attentive_region_mask(g, weight, torch.zeros(1, 2), 0.8)
    assert no_finding.all()
    constant = torch.full((2, 5, 5), 3.0)
    assert region_mask(constant, 0.8).all()
    zeros_features = torch.zeros(1, 2, 7, 7)  # all-zero g: M = 0 everywhere
    assert attentive_region_mask(zeros_features, weight, torch.tensor([[1.0, 1.0]]), 0.8).all()
    assert torch.equal(normalize_maps(constant), torch.zeros_like(constant))


def test_non_finite_map_keeps_whole_map():
    maps = torch.full((1, 3, 3), float("nan"))
    assert region_mask(maps, 0.8).all()


@pytest.mark.parametrize("pooling", ["gap", "box"])
def test_masking_and_pooling_against_hand_computation(pooling):
    model = feature_model(num_features=2, num_classes=2, rv_pooling=pooling)
    with torch.no_grad():
        model.global_head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    g = hot_block_features(rows=(2, 4), cols=(1, 3))
    labels = torch.tensor([[1.0, 0.0]])
    out = model(g, labels=labels)
    inside = g[0, :, 2:5, 1:4]  # (2, 3, 3) the box
    denominator = 49.0 if pooling == "gap" else 9.0
    f_region = inside.sum(dim=(1, 2)) / denominator
    expected = model.region_head.weight @ f_region + model.region_head.bias
    torch.testing.assert_close(out["region_logits"][0], expected)
    # zeroing outside: channel 1 (not in class 0's CAM, so the box stays) changed outside the box
    # leaves the region logits unchanged; changed inside the box, it changes them.
    outside = g.clone()
    outside[0, 1, 5:, :] += 10.0
    outside[0, 1, :, 4:] += 10.0
    changed = model(outside, labels=labels)
    assert torch.equal(changed["region_mask"], out["region_mask"])
    torch.testing.assert_close(changed["region_logits"], out["region_logits"])
    inside_changed = g.clone()
    inside_changed[0, 1, 3, 2] += 10.0
    assert not torch.allclose(model(inside_changed, labels=labels)["region_logits"], out["region_logits"])


def test_masked_pool_modes_direct():
    g = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(1, 2, 3, 4)
    mask = torch.zeros(1, 3, 4, dtype=torch.bool)
    mask[0, 1:3, 0:2] = True
    box_sum = g[0, :, 1:3, 0:2].sum(dim=(1, 2))
    torch.testing.assert_close(masked_pool(g, mask, "gap")[0], box_sum / 12)
    torch.testing.assert_close(masked_pool(g, mask, "box")[0], box_sum / 4)
    with pytest.raises(ValueError, match="rv_pooling"):
        masked_pool(g, mask, "max")


def test_region_logits_only_for_first_rows_and_label_shape_checked():
    model = feature_model()
    g = torch.rand(6, 5, 4, 4)
    out = model(g, labels=torch.ones(2, 4))
    assert out["region_logits"].shape == (2, 4) and out["logits"].shape == (6, 4)
    direct = model(g[:2], labels=torch.ones(2, 4))
    torch.testing.assert_close(out["region_logits"], direct["region_logits"])
    assert "region_logits" not in model(g)
    with pytest.raises(ValueError, match="labels must be"):
        model(g, labels=torch.ones(7, 4))
    with pytest.raises(ValueError, match="labels must be"):
        model(g, labels=torch.ones(2, 3))


def test_normalized_embeddings_option_keeps_logits_raw():
    g = torch.rand(3, 5, 4, 4)
    raw = feature_model()(g)
    normed = feature_model(normalize_embeddings=True)(g)
    torch.testing.assert_close(normed["logits"], raw["logits"])
    torch.testing.assert_close(normed["embedding"].norm(dim=1), torch.ones(3))
    torch.testing.assert_close(raw["embedding"], g.mean(dim=(2, 3)))
