"""Gradient routing of the three losses, and a tiny model overfitting one batch."""

from __future__ import annotations

import torch
from torch import nn

from cxrloc.config import LossConfig, ModelConfig
from cxrloc.model import DLRVLoss, build_model
from cxrloc.model.dlrv import DLRV


def tiny_model(**kwargs) -> DLRV:
    torch.manual_seed(0)
    return build_model(ModelConfig(backbone="densenet-tiny", pretrained=False, **kwargs))


def grads_after(model: DLRV, loss: torch.Tensor) -> dict[str, bool]:
    model.zero_grad(set_to_none=True)
    loss.backward()

    def has(params):
        return any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)

    return {
        "backbone": has(model.backbone.parameters()),
        "global": has(model.global_head.parameters()),
        "region": has(model.region_head.parameters()),
    }


def test_each_loss_reaches_exactly_its_parameters():
    model = tiny_model()
    x = torch.randn(6, 3, 64, 64)
    labels = torch.zeros(6, 14)
    labels[0, [0, 3]] = 1
    labels[1, 2] = 1
    labels[3, [0, 3]] = 1
    labels[5, 7] = 1
    crit = DLRVLoss(LossConfig())
    out = model(x, labels=crit.region_labels(labels, 2))
    terms = crit(out, labels, 2)
    assert grads_after(model, terms["bce"]) == {"backbone": True, "global": True, "region": False}
    out = model(x, labels=crit.region_labels(labels, 2))
    # L_RV: the mask comes from detached CAMs, so W_G (which defines the CAM) gets no gradient
    assert grads_after(model, crit(out, labels, 2)["rv"]) == {"backbone": True, "global": False, "region": True}
    out = model(x)
    triplet_only = DLRVLoss(LossConfig(use_rv=False))
    assert grads_after(model, triplet_only(out, labels, 2)["triplet"]) == {"backbone": True, "global": False, "region": False}


def test_no_gradient_through_the_mask():
    """d(region logits)/dg is exactly mask / (h*w) * v: the box contributes no derivative."""
    torch.manual_seed(0)
    model = DLRV(nn.Identity(), 4, num_classes=3)
    g = torch.rand(2, 4, 5, 5, requires_grad=True)
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    out = model(g, labels=labels)
    out["region_logits"][:, 1].sum().backward()
    mask = out["region_mask"].float()
    expected = model.region_head.weight[1][None, :, None, None] * mask[:, None] / 25.0
    torch.testing.assert_close(g.grad, expected.expand_as(g))


def synthetic_batch(n: int = 8, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Images with a bright square whose position encodes one of 4 classes."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, size, size, generator=gen) * 0.2
    labels = torch.zeros(n, 14)
    corners = [(0, 0), (0, size // 2), (size // 2, 0), (size // 2, size // 2)]
    for i in range(n):
        c = i % 4
        r, col = corners[c]
        x[i, :, r : r + size // 2, col : col + size // 2] += 1.5
        labels[i, c] = 1
    return x, labels


def test_tiny_model_overfits_one_batch_full_dlrv():
    """Full DLRV loss on 8 images (anchors; positives and negatives drawn from the same 8) falls > 90%."""
    x, labels = synthetic_batch()
    classes = labels.argmax(1)
    positives = torch.tensor([(i + 4) % 8 for i in range(8)])  # same class
    negatives = torch.tensor([(i + 1) % 8 for i in range(8)])  # other class
    assert torch.equal(classes[positives], classes) and (classes[negatives] != classes).all()
    batch = torch.cat([x, x[positives], x[negatives]])
    batch_labels = torch.cat([labels, labels[positives], labels[negatives]])
    model = tiny_model()
    crit = DLRVLoss(LossConfig())
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(50):
        out = model(batch, labels=crit.region_labels(batch_labels, 8))
        loss = crit(out, batch_labels, 8)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0], losses[::10]
