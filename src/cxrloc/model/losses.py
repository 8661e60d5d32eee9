"""DLRV losses: L = w_G L_G + w_RV L_RV + w_DL L_DL (eq. 9; paper: all weights 1).

L_G   BCE of the global logits, mean over rows and classes (eq. 2).
L_RV  BCE of the region logits (eq. 8), mean over rows and classes.
L_DL  triplet loss max(0, ||f(a) - f(p)||_2 - ||f(a) - f(n)||_2 + m), m = 0.5, plain
      (not squared) L2 between embeddings, mean over triplets (eq. 4-5). This is
      ``torch.nn.functional.triplet_margin_loss`` with p=2 and eps=0 (torch's default
      eps=1e-6 is added to the difference vector; 0 makes it exactly eq. 4).

Batch convention: with distance learning on, the model ran once over
``[anchors; positives; negatives]`` (3N rows, N = ``num_anchors``). L_G and L_RV use the
anchors only (paper) unless ``loss_cfg.aux_on_all`` (then all 3N labelled rows). Without
distance learning every row is an anchor. Switched-off terms are zero tensors.

Typical training step (one backbone pass; region logits only when RV is on)::

    out = model(x, labels=criterion.region_labels(labels, num_anchors))
    terms = criterion(out, labels, num_anchors)
    terms["loss"].backward()
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cxrloc.config import LossConfig


def triplet_loss(anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, margin: float) -> torch.Tensor:
    """Mean over triplets of max(0, ||a - p||_2 - ||a - n||_2 + margin) (eq. 4-5); inputs (N, K)."""
    return F.triplet_margin_loss(anchor, positive, negative, margin=margin, p=2.0, eps=0.0, swap=False)


class DLRVLoss(nn.Module):
    """The total loss of eq. 9 with the variant switches of ``LossConfig``.

    Variants: baseline (use_dl=False, use_rv=False: BCE only), w/o DL (BCE + RV),
    w/o RV (BCE + triplet), DLRV (all three).
    """

    def __init__(self, loss_cfg: LossConfig | None = None) -> None:
        super().__init__()
        self.cfg = loss_cfg or LossConfig()

    def region_labels(self, labels: torch.Tensor, num_anchors: int) -> torch.Tensor | None:
        """Labels to pass as ``model(x, labels=...)``: None when RV is off (no region compute).

        Args:
            labels: (B, C) labels of every row, or (N, C) of the anchors only.
            num_anchors: N (with DL the batch holds B = 3N rows).

        Returns:
            the first N rows (all B rows with ``aux_on_all``), or None.
        """
        if not self.cfg.use_rv:
            return None
        rows = (3 * num_anchors if self.cfg.use_dl else num_anchors) if self.cfg.aux_on_all else num_anchors
        if labels.shape[0] < rows:
            raise ValueError(f"need labels for the first {rows} rows, got {labels.shape[0]}")
        return labels[:rows]

    def forward(
        self, outputs: dict[str, torch.Tensor], labels: torch.Tensor, num_anchors: int | None = None
    ) -> dict[str, torch.Tensor]:
        """Loss terms.

        Args:
            outputs: ``DLRV.forward`` dict: ``logits`` (B, C), ``embedding`` (B, K), and
                ``region_logits`` (R, C) when RV is on.
            labels: (B, C) multi-hot labels of all rows, or (N, C) of the anchors
                (enough unless ``aux_on_all``).
            num_anchors: N; with DL the batch must be 3N rows. None: B / 3 with DL, else B.

        Returns:
            ``loss`` (total, eq. 9), ``bce`` (eq. 2), ``rv`` (eq. 8), ``triplet`` (eq. 5): scalars;
            the unweighted terms (attached to the graph), zero when switched off.
        """
        logits = outputs["logits"]
        batch = logits.shape[0]
        anchors = self._num_anchors(batch, num_anchors)
        rows = batch if self.cfg.aux_on_all else anchors
        if labels.ndim != 2 or labels.shape[1] != logits.shape[1] or labels.shape[0] < rows:
            raise ValueError(
                f"labels must be ({rows} or more, {logits.shape[1]}) for {batch} rows, got {tuple(labels.shape)}"
            )
        targets = labels[:rows].float()
        zero = logits.new_zeros((), dtype=torch.float32)
        bce = F.binary_cross_entropy_with_logits(logits[:rows].float(), targets)

        rv = zero
        if self.cfg.use_rv:
            region = outputs.get("region_logits")
            if region is None:
                raise ValueError("use_rv is on but the outputs have no region_logits: call model(x, labels=...)")
            if region.shape[0] != rows:
                raise ValueError(f"region_logits has {region.shape[0]} rows, expected {rows}")
            rv = F.binary_cross_entropy_with_logits(region.float(), targets)

        triplet = zero
        if self.cfg.use_dl:
            emb = outputs["embedding"].float()
            triplet = triplet_loss(emb[:anchors], emb[anchors : 2 * anchors], emb[2 * anchors :], self.cfg.margin)

        total = self.cfg.weight_g * bce
        if self.cfg.use_rv:
            total = total + self.cfg.weight_rv * rv
        if self.cfg.use_dl:
            total = total + self.cfg.weight_dl * triplet
        return {"loss": total, "bce": bce, "rv": rv, "triplet": triplet}

    def _num_anchors(self, batch: int, num_anchors: int | None) -> int:
        if self.cfg.use_dl:
            if num_anchors is None:
                if batch % 3:
                    raise ValueError(f"distance learning needs [anchors; positives; negatives], got {batch} rows")
                return batch // 3
            if batch != 3 * num_anchors:
                raise ValueError(f"distance learning: expected 3 * {num_anchors} rows, got {batch}")
            return num_anchors
        if num_anchors is not None and num_anchors != batch:
            raise ValueError(f"without distance learning every row is an anchor: {num_anchors} anchors, {batch} rows")
        return batch
