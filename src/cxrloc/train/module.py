"""LightningModule around the plain-PyTorch DLRV model and its losses (METHOD.md, Training).

One training step (eq. 9):
    images (R, S, S) uint8 on the device -> augment (rotation +-5 deg, hflip) + ImageNet
    normalisation -> x (R, 3, H, W), R = 3N as [anchors; positives; negatives] with
    distance learning (one backbone pass), R = N anchors without it;
    terms = DLRVLoss(model(x, labels), labels, N): ``loss`` = L_G + L_RV + L_DL and the
    named terms ``bce``, ``rv``, ``triplet``, all logged every step (and their epoch means).

Validation, every epoch, over all val images (gathered across ranks):
    per-finding ROC AUC (sklearn) of the global scores sigmoid(logit) (eq. 1) and of the
    eq. 10 ensemble sigmoid(global + class-specific region logit) (``model.predict``),
    NaN for a finding with one class only; means over the defined findings.
    Selection metric ``val/auc_mean`` (ours): the eq. 10 ensemble AUC when RV is on (that is
    the paper's inference score), else the global AUC.

Non-finite loss (``train.nonfinite``): the decision is agreed across ranks; the optimizer
step is skipped either way; ``"skip"`` counts it (``train/nonfinite_skipped``) and goes on,
``"stop"`` ends the run after this step and no further checkpoint is written.

Randomness (ours): at the start of every epoch the global RNGs and the augmentation
generator are seeded from (seed, epoch, rank), so an epoch's computation depends only on
the weights, optimizer state and that key; this is what makes resume exact.
"""

from __future__ import annotations

import copy
import logging
import math
import random
from typing import Any

import lightning as L
import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from cxrloc.config import Config
from cxrloc.data.transforms import batch_transform
from cxrloc.labels import FINDINGS
from cxrloc.model import DLRVLoss, build_model
from cxrloc.train.datamodule import STREAM_AUGMENT, STREAM_GLOBAL, derived_seed

log = logging.getLogger(__name__)

LOSS_TERMS = ("loss", "bce", "rv", "triplet")


def per_finding_auc(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """ROC AUC per column (sklearn ``roc_auc_score``); NaN where a column has a single class.

    Args:
        labels: (N, C) 0/1.
        scores: (N, C) probabilities or logits.

    Returns:
        (C,) float64.
    """
    labels = np.asarray(labels)
    scores = np.asarray(scores, dtype=np.float64)
    out = np.full(labels.shape[1], np.nan)
    for c in range(labels.shape[1]):  # 14 columns; roc_auc_score itself is vectorised
        y = labels[:, c]
        if y.min() != y.max() and np.isfinite(scores[:, c]).all():
            out[c] = roc_auc_score(y, scores[:, c])
    return out


def nanmean_or_nan(values: np.ndarray) -> float:
    """Mean of the finite values, NaN when there is none (no RuntimeWarning)."""
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    return float(finite.mean()) if finite.size else float("nan")


class DLRVModule(L.LightningModule):
    """Training and validation of the DLRV model.

    Args:
        cfg: the run's config.
        resume: a checkpoint dict (``cxrloc.model.checkpoint`` format) to continue from:
            model weights now, optimizer / scheduler state in :meth:`configure_optimizers`.

    Attributes set during fitting (read by :class:`cxrloc.train.callbacks.RunCheckpoint`):
        val_metrics: last validation results (plain floats / lists).
        epoch_train: epoch means of the loss terms over all ranks, anchors seen.
        nonfinite_skipped: steps skipped for a non-finite loss (whole run).
        nonfinite_stop: the message when ``train.nonfinite == "stop"`` fired, else None.
    """

    def __init__(self, cfg: Config, resume: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        model_cfg = copy.deepcopy(cfg.model)
        if resume is not None:  # every weight comes from the checkpoint
            model_cfg.pretrained = False
            model_cfg.weights_path = None
        self.model = build_model(model_cfg, use_region=cfg.loss.use_rv)
        if resume is not None:
            self.model.load_state_dict(resume["state_dict"], strict=True)
        if not cfg.loss.use_rv:  # W_RV gets no gradient without RV; frozen so DDP sees no unused parameters
            self.model.region_head.requires_grad_(False)
        if cfg.train.channels_last:
            self.model.to(memory_format=torch.channels_last)
        if cfg.train.compile:  # the backbone pass only: the heads' data-dependent boxes stay eager
            mode = None if cfg.train.compile_mode == "default" else cfg.train.compile_mode
            self.model.forward_features = torch.compile(self.model.forward_features, mode=mode)  # state_dict unchanged
        # CUDA graphs (torch.compile modes "reduce-overhead" / "max-autotune") replay into static buffers:
        # each step is marked so a replay never overwrites outputs the previous step still uses
        self._cudagraphs = cfg.train.compile and cfg.train.compile_mode in ("reduce-overhead", "max-autotune")
        self.criterion = DLRVLoss(cfg.loss)
        extra = (resume or {}).get("extra", {})
        self._resume_optimizer = extra.get("optimizer")
        self._resume_scheduler = extra.get("scheduler")
        self._resume_epochs = int(resume["epoch"]) if resume is not None else 0
        self.nonfinite_skipped = int(extra.get("nonfinite_skipped", 0))
        self.nonfinite_stop: str | None = None
        self.val_metrics: dict[str, Any] = {}
        self.epoch_train: dict[str, float] = {}
        self._augment_generator: torch.Generator | None = None
        self._val_outputs: list[dict[str, torch.Tensor]] = []
        self._term_sums: torch.Tensor | None = None

    # ------------------------------------------------------------------ inputs
    def train_inputs(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (R, S, S) on the device -> augmented (rotation +-5 deg, hflip; optional zoom, shift, vflip), normalised."""
        return self._layout(batch_transform(images, self.cfg.data, train=True, generator=self._augment_generator))

    def eval_inputs(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (R, S, S) -> resized, normalised (R, 3, H, W), no augmentation."""
        return self._layout(batch_transform(images, self.cfg.data, train=False))

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.cfg.train.channels_last else x

    # ------------------------------------------------------------------ training
    def on_train_epoch_start(self) -> None:
        seed, epoch, rank = self.cfg.train.seed, self.current_epoch, self.global_rank
        s = derived_seed(seed, epoch, rank, STREAM_GLOBAL)
        torch.manual_seed(s)
        np.random.seed(s % (1 << 32))
        random.seed(s)
        gen = torch.Generator()  # CPU: batch_transform draws the per-sample parameters on the CPU
        gen.manual_seed(derived_seed(seed, epoch, rank, STREAM_AUGMENT))
        self._augment_generator = gen
        self._term_sums = torch.zeros(len(LOSS_TERMS) + 1, device=self.device, dtype=torch.float64)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        labels = batch["labels"].float()
        n = int(batch["num_anchors"])
        if self._cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        x = self.train_inputs(batch["images"])
        out = self.model(x, labels=self.criterion.region_labels(labels, n))
        terms = self.criterion(out, labels, n)
        loss = terms["loss"]
        finite = bool(torch.isfinite(loss).item())
        if self.trainer.world_size > 1:  # every rank must take the same branch (collectives)
            finite = bool(self.trainer.strategy.reduce_boolean_decision(finite, all=True))
        if not finite:
            return self._nonfinite(terms, batch_idx)
        for k in LOSS_TERMS:
            self.log(f"train/{k}", terms[k].detach().float(), on_step=True, on_epoch=True, batch_size=n,
                     sync_dist=True, prog_bar=k == "loss")
        assert self._term_sums is not None
        step = torch.stack([terms[k].detach().double() * n for k in LOSS_TERMS])
        self._term_sums[: len(LOSS_TERMS)] += step
        self._term_sums[len(LOSS_TERMS)] += n  # anchors in finite steps
        return loss

    def _nonfinite(self, terms: dict[str, torch.Tensor], batch_idx: int) -> None:
        where = f"epoch {self.current_epoch + 1}, step {self.global_step} (batch {batch_idx})"
        values = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in terms.items())
        if self.cfg.train.nonfinite == "skip":
            self.nonfinite_skipped += 1
            log.warning("non-finite loss at %s (%s): optimizer step skipped (%d so far)", where, values,
                        self.nonfinite_skipped)
            self.log("train/nonfinite_skipped", float(self.nonfinite_skipped), on_step=True, on_epoch=False)
            return None
        self.nonfinite_stop = (
            f"non-finite loss at {where} ({values}); train.nonfinite=stop: training stopped, "
            "no checkpoint written after the last completed epoch"
        )
        log.error(self.nonfinite_stop)
        self.trainer.should_stop = True
        return None

    def on_train_epoch_end(self) -> None:
        assert self._term_sums is not None
        sums = self._term_sums.clone()
        if self.trainer.world_size > 1:
            sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
        anchors = float(sums[len(LOSS_TERMS)])
        means = {k: (float(sums[i]) / anchors if anchors else float("nan")) for i, k in enumerate(LOSS_TERMS)}
        optimizer = self.trainer.optimizers[0]
        self.epoch_train = {
            **{f"train_{k}": v for k, v in means.items()},
            "train_anchors": anchors,
            "lr": float(optimizer.param_groups[0]["lr"]),
            "nonfinite_skipped": float(self.nonfinite_skipped),
        }

    # ------------------------------------------------------------------ validation
    def on_validation_epoch_start(self) -> None:
        self._val_outputs = []

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if self._cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        x = self.eval_inputs(batch["images"])
        pred = self.model.predict_from_features(self.model.forward_features(x))
        self._val_outputs.append(
            {
                "rows": batch["rows"].long(),
                "labels": batch["labels"].float(),
                "global": torch.sigmoid(pred["logits"].float()),
                "ensemble": pred["probs"].float(),
            }
        )

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        local = self._gather_inputs()
        gathered = self._gather(local)
        self._val_outputs = []
        rows = gathered["rows"].cpu().numpy()
        expected = getattr(self.trainer.datamodule, "val_rows", None)
        if expected is not None and (len(np.unique(rows)) != len(rows) or set(rows.tolist()) != set(expected.tolist())):
            raise RuntimeError(
                f"validation saw {len(rows)} scores for {len(np.unique(rows))} distinct images; "
                f"the val split has {len(expected)} (gather lost or duplicated images)"
            )
        order = np.argsort(rows)
        labels = gathered["labels"].cpu().numpy()[order]
        auc_global = per_finding_auc(labels, gathered["global"].cpu().numpy()[order])
        auc_ensemble = per_finding_auc(labels, gathered["ensemble"].cpu().numpy()[order])
        selected = auc_ensemble if self.cfg.loss.use_rv else auc_global
        metrics = {
            "val/auc_mean": nanmean_or_nan(selected),
            "val/auc_mean_global": nanmean_or_nan(auc_global),
            "val/auc_mean_ensemble": nanmean_or_nan(auc_ensemble),
        }
        metrics.update({f"val/auc/{name}": float(v) for name, v in zip(FINDINGS, selected, strict=True)})
        self.val_metrics = {
            **metrics,
            "val_images": len(rows),
            "auc_per_finding": [None if math.isnan(v) else float(v) for v in selected],
        }
        self.log_dict(metrics, on_step=False, on_epoch=True, sync_dist=True)

    def _gather_inputs(self) -> dict[str, torch.Tensor]:
        if self._val_outputs:
            return {k: torch.cat([o[k] for o in self._val_outputs]) for k in self._val_outputs[0]}
        c = len(FINDINGS)
        empty = torch.zeros(0, c, device=self.device)
        return {"rows": torch.zeros(0, dtype=torch.long, device=self.device), "labels": empty, "global": empty,
                "ensemble": empty}

    def _gather(self, local: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """All ranks' validation outputs; shards are padded to equal length with row -1, then dropped."""
        world = self.trainer.world_size
        if world == 1:
            return local
        lengths = self.all_gather(torch.tensor(len(local["rows"]), device=self.device))
        longest = int(lengths.max().item())
        padded = {}
        for k, v in local.items():
            pad = longest - len(v)
            fill = -1 if k == "rows" else 0
            padded[k] = torch.cat([v, torch.full((pad, *v.shape[1:]), fill, dtype=v.dtype, device=v.device)])
        out = self.all_gather(padded)  # each (world, longest, ...)
        flat = {k: v.reshape(-1, *v.shape[2:]) for k, v in out.items()}
        keep = flat["rows"] >= 0
        return {k: v[keep] for k, v in flat.items()}

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> dict[str, Any]:
        """Adam (lr 1e-3) and StepLR: lr / 10 every ``lr_decay_epochs`` epochs (paper: "after E epochs").

        The scheduler steps once per epoch, so after E completed epochs ``last_epoch == E``.
        On resume the saved states are loaded; should the saved scheduler lag the completed
        epochs (saved before its end-of-epoch step), it is stepped up to them here.
        """
        t = self.cfg.train
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=t.lr_decay_epochs, gamma=t.lr_decay_factor)
        if self._resume_optimizer is not None:
            optimizer.load_state_dict(self._resume_optimizer)
            scheduler.load_state_dict(self._resume_scheduler)
            while scheduler.last_epoch < self._resume_epochs:
                scheduler.step()
            self._resume_optimizer = self._resume_scheduler = None
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch", "frequency": 1}}
