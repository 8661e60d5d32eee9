"""Losses (eq. 2, 4-5, 8, 9): triplet vs a hand loop, BCE, variant switches, batch conventions."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from cxrloc.config import LossConfig, load_config
from cxrloc.model import DLRVLoss
from cxrloc.model.dlrv import DLRV
from cxrloc.model.losses import triplet_loss


def hand_triplet(a: torch.Tensor, p: torch.Tensor, n: torch.Tensor, margin: float) -> float:
    """eq. 4-5 with explicit loops: mean over triplets of max(0, ||a-p|| - ||a-n|| + m), plain L2."""
    total = 0.0
    for i in range(a.shape[0]):
        d_ap = math.sqrt(sum((float(a[i, k]) - float(p[i, k])) ** 2 for k in range(a.shape[1])))
        d_an = math.sqrt(sum((float(a[i, k]) - float(n[i, k])) ** 2 for k in range(a.shape[1])))
        total += max(0.0, d_ap - d_an + margin)
    return total / a.shape[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(1, 3), (5, 8), (16, 33)])
@pytest.mark.parametrize("margin", [0.5, 2.0])
def test_triplet_matches_hand_loop(shape, dtype, margin):
    gen = torch.Generator().manual_seed(sum(shape))
    a, p, n = (torch.randn(*shape, generator=gen, dtype=dtype) * 0.3 for _ in range(3))
    got = triplet_loss(a, p, n, margin)
    assert got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert abs(float(got) - hand_triplet(a, p, n, margin)) < tol


def test_triplet_hinge_and_identical_pairs():
    a = torch.zeros(2, 4)
    far = torch.full((2, 4), 10.0)
    assert float(triplet_loss(a, a.clone(), far, 0.5)) == 0.0  # satisfied margin -> 0
    assert float(triplet_loss(a, far, a.clone(), 0.5)) == pytest.approx(20.5)  # 20 - 0 + 0.5
    anchor = torch.zeros(1, 3, requires_grad=True)
    loss = triplet_loss(anchor, torch.zeros(1, 3), torch.zeros(1, 3), 0.5)  # all distances 0
    loss.backward()
    assert float(loss.detach()) == 0.5 and torch.isfinite(anchor.grad).all()


def make_outputs(num_anchors: int = 4, classes: int = 14, dim: int = 6, rows_rv: int | None = None, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    batch = 3 * num_anchors
    outputs = {
        "logits": torch.randn(batch, classes, generator=gen),
        "embedding": torch.randn(batch, dim, generator=gen),
        "region_logits": torch.randn(rows_rv or num_anchors, classes, generator=gen),
    }
    labels = (torch.rand(batch, classes, generator=gen) > 0.7).float()
    return outputs, labels


def bce(logits: torch.Tensor, targets: torch.Tensor) -> float:
    p = torch.sigmoid(logits.double())
    t = targets.double()
    return float(-(t * p.log() + (1 - t) * (1 - p).log()).mean())


def test_full_loss_terms_against_formulas():
    outputs, labels = make_outputs()
    terms = DLRVLoss(LossConfig())(outputs, labels, num_anchors=4)
    a, p, n = outputs["embedding"].split(4)
    assert float(terms["bce"]) == pytest.approx(bce(outputs["logits"][:4], labels[:4]), rel=1e-5)
    assert float(terms["rv"]) == pytest.approx(bce(outputs["region_logits"], labels[:4]), rel=1e-5)
    assert float(terms["triplet"]) == pytest.approx(hand_triplet(a, p, n, 0.5), rel=1e-5)
    assert float(terms["loss"]) == pytest.approx(float(terms["bce"] + terms["rv"] + terms["triplet"]), rel=1e-6)


def test_variant_switches_change_exactly_their_terms():
    full = DLRVLoss(load_config("dlrv").loss)
    outputs, labels = make_outputs()
    ref = full(outputs, labels, 4)
    no_rv = DLRVLoss(load_config("dlrv_no_rv").loss)(outputs, labels, 4)
    assert float(no_rv["rv"]) == 0.0
    assert torch.equal(no_rv["bce"], ref["bce"]) and torch.equal(no_rv["triplet"], ref["triplet"])
    assert float(no_rv["loss"]) == pytest.approx(float(ref["bce"] + ref["triplet"]))
    # without DL the batch is anchors only
    anchors_only = {"logits": outputs["logits"][:4], "embedding": outputs["embedding"][:4],
                    "region_logits": outputs["region_logits"]}
    no_dl = DLRVLoss(load_config("dlrv_no_dl").loss)(anchors_only, labels[:4], 4)
    assert float(no_dl["triplet"]) == 0.0
    assert torch.equal(no_dl["bce"], ref["bce"]) and torch.equal(no_dl["rv"], ref["rv"])
    assert float(no_dl["loss"]) == pytest.approx(float(ref["bce"] + ref["rv"]))
    base = DLRVLoss(load_config("baseline").loss)({"logits": outputs["logits"][:4],
                                                   "embedding": outputs["embedding"][:4]}, labels[:4], 4)
    assert float(base["rv"]) == 0.0 and float(base["triplet"]) == 0.0
    assert torch.equal(base["loss"], base["bce"]) and torch.equal(base["bce"], ref["bce"])


def test_loss_weights_apply():
    outputs, labels = make_outputs()
    cfg = LossConfig(weight_g=2.0, weight_rv=0.5, weight_dl=3.0)
    t = DLRVLoss(cfg)(outputs, labels, 4)
    assert float(t["loss"]) == pytest.approx(float(2 * t["bce"] + 0.5 * t["rv"] + 3 * t["triplet"]), rel=1e-6)


def test_aux_on_all_uses_all_rows():
    outputs, labels = make_outputs(rows_rv=12)
    crit = DLRVLoss(LossConfig(aux_on_all=True))
    t = crit(outputs, labels, 4)
    assert float(t["bce"]) == pytest.approx(bce(outputs["logits"], labels), rel=1e-5)
    assert float(t["rv"]) == pytest.approx(bce(outputs["region_logits"], labels), rel=1e-5)
    assert crit.region_labels(labels, 4).shape == (12, 14)
    with pytest.raises(ValueError, match="labels"):
        crit(outputs, labels[:4], 4)  # needs labels of all 12 rows


def test_region_labels_helper():
    labels = torch.ones(12, 14)
    assert DLRVLoss(LossConfig()).region_labels(labels, 4).shape == (4, 14)
    assert DLRVLoss(LossConfig(use_rv=False)).region_labels(labels, 4) is None
    assert DLRVLoss(LossConfig(use_dl=False)).region_labels(labels[:4], 4).shape == (4, 14)


def test_batch_convention_errors_are_clear():
    outputs, labels = make_outputs()
    crit = DLRVLoss(LossConfig())
    with pytest.raises(ValueError, match="3 \\* 5 rows"):
        crit(outputs, labels, 5)
    with pytest.raises(ValueError, match="region_logits"):
        crit({k: v for k, v in outputs.items() if k != "region_logits"}, labels, 4)
    with pytest.raises(ValueError, match="every row is an anchor"):
        DLRVLoss(LossConfig(use_dl=False))(outputs, labels, 4)
    assert float(crit(outputs, labels)["loss"]) == float(crit(outputs, labels, 4)["loss"])  # N inferred


def test_one_model_call_per_step_end_to_end():
    """The documented step: one backbone pass over [a; p; n], region logits for anchors only."""
    torch.manual_seed(0)
    model = DLRV(nn.Identity(), 6, num_classes=14)
    g = torch.rand(9, 6, 4, 4)
    labels = (torch.rand(9, 14) > 0.6).float()
    crit = DLRVLoss(LossConfig())
    out = model(g, labels=crit.region_labels(labels, 3))
    assert out["region_logits"].shape == (3, 14)
    terms = crit(out, labels, 3)
    assert torch.isfinite(terms["loss"])
    no_rv = DLRVLoss(LossConfig(use_rv=False))
    assert "region_logits" not in model(g, labels=no_rv.region_labels(labels, 3))
