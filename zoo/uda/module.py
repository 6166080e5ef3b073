"""UDA: Unsupervised Data Augmentation for Consistency Training (Xie et al., NeurIPS 2020).

The prediction on an unlabeled image's original (weakly augmented) view, sharpened with temperature T, is the
target for the prediction on a strongly augmented view (UDA's RandAugment + Cutout, ``zoo.uda.views``):

    loss = CE_tsa(labeled) + lambda_u * mean_over_all_unlabeled( 1[max p_weak > beta] * KL(softmax(z_weak / T) || p_strong) )

Follows the paper and the official code (google-research/uda, ``image/main.py``):

- the target is ``softmax(logits_weak / T)``, T = 0.4, without gradient. USB (microsoft/Semi-supervised-learning)
  >= 0.3.0 silently ignores T (its targets are the un-sharpened probabilities); we sharpen, as the paper does;
- the confidence mask uses the *un-sharpened* ``softmax(logits_weak)`` with a strict ``>`` (USB: ``>=``);
- the consistency term is the KL divergence (USB: soft-target cross-entropy, same gradient, offset by the
  target's entropy), averaged over all unlabeled samples, masked ones included;
- training-signal annealing (TSA, off for CIFAR-10 in the paper and the official script): a labeled sample is
  dropped when the probability of its *correct* class exceeds ``eta_t = alpha_t (1 - 1/K) + 1/K``, and the kept
  cross-entropies are summed and divided by ``max(#kept, 1)``. USB instead drops a sample when its *largest*
  probability exceeds eta_t and divides by the whole batch; the two disagree on confidently wrong samples and
  whenever samples are dropped. With ``r = t / total_steps`` (t: optimizer steps already taken), ``alpha_t`` is
  ``r`` (linear), ``exp(5 (r - 1))`` (exp) or ``1 - exp(-5 r)`` (log);
- labeled, original and augmented views go through one forward pass (shared BatchNorm statistics), as in both
  references; evaluation uses an EMA of the weights (0.9999) that also averages the BatchNorm statistics.

Where we follow the zoo base instead of the official code: weight decay is SGD's ``weight_decay`` (the same update
as the official ``5e-4 * sum ||v||^2 / 2`` loss term) but skips biases and BatchNorm parameters, which the official
code decays too; the labeled split is class-balanced (the official CIFAR-10 split is the first 4,000 images).
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from zoo.core.module import ZooModule

__all__ = ["UDA", "sharpened_targets", "confidence_mask", "kl_consistency_loss", "tsa_threshold",
           "tsa_supervised_loss"]

TSASchedule = Literal["none", "linear", "log", "exp"]


def sharpened_targets(logits_weak: torch.Tensor, temperature: float) -> torch.Tensor:
    """``softmax(logits / T)`` without gradient; T = 1 leaves the probabilities as they are."""
    return torch.softmax(logits_weak.detach().float() / temperature, dim=-1)


def confidence_mask(logits_weak: torch.Tensor, threshold: float) -> torch.Tensor:
    """1.0 where the un-sharpened ``max softmax`` is strictly above ``threshold`` (0 keeps every sample)."""
    return (torch.softmax(logits_weak.detach().float(), dim=-1).amax(dim=-1) > threshold).float()


def kl_consistency_loss(logits_strong: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``KL(targets || softmax(logits_strong))`` per sample, zeroed where masked, averaged over all samples."""
    log_q = F.log_softmax(logits_strong.float(), dim=-1)
    kl = (torch.special.xlogy(targets, targets) - targets * log_q).sum(dim=-1)
    return (kl * mask).mean()


def tsa_threshold(schedule: TSASchedule, progress: float, num_classes: int) -> float:
    """``eta_t = alpha_t (1 - 1/K) + 1/K`` at ``progress = t / T``; ``none`` gives 1 (no sample is dropped)."""
    if schedule == "none":
        return 1.0
    alpha = {"linear": progress, "exp": math.exp((progress - 1) * 5),
             "log": 1 - math.exp(-progress * 5)}[schedule]
    return alpha * (1 - 1 / num_classes) + 1 / num_classes


def tsa_supervised_loss(logits_lb: torch.Tensor, labels: torch.Tensor, threshold: float
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy over the labeled samples whose correct-class probability is not above ``threshold``,
    summed and divided by ``max(#kept, 1)``; returns the loss and the keep-mask."""
    logits_lb = logits_lb.float()
    correct_prob = torch.softmax(logits_lb.detach(), dim=-1).gather(1, labels[:, None]).squeeze(1)
    keep = (correct_prob <= threshold).float()
    ce = F.cross_entropy(logits_lb, labels, reduction="none")
    return (ce * keep).sum() / keep.sum().clamp_min(1), keep


class UDA(ZooModule):
    """UDA. Defaults are the paper's CIFAR-10 setting (official ``run_cifar10_gpu.sh``): WRN-28-2, T 0.4,
    threshold 0.8, no TSA, SGD-nesterov lr 0.03 with ``cos(7 pi t / 16 T)``, weight decay 5e-4, EMA 0.9999.

    Args:
        network: classifier with ``classifier.out_features`` classes.
        temperature: sharpening temperature T of the targets (0.4; 1 turns sharpening off).
        threshold: confidence threshold beta on the un-sharpened weak-view probabilities (0.8; 0 turns it off).
        lambda_u: weight of the consistency loss (1.0).
        tsa_schedule: training-signal annealing: ``none`` (CIFAR-10), ``linear``, ``log`` or ``exp``.
        The optimisation arguments are the base's (see ``ZooModule``), with the official values as defaults.
    """

    def __init__(self, network: nn.Module, temperature: float = 0.4, threshold: float = 0.8, lambda_u: float = 1.0,
                 tsa_schedule: TSASchedule = "none", ema_decay: float | None = 0.9999, ema_buffers: str = "average",
                 **base):
        super().__init__(network, ema_decay=ema_decay, ema_buffers=ema_buffers, **base)
        if tsa_schedule not in ("none", "linear", "log", "exp"):
            raise ValueError(f"unknown tsa_schedule {tsa_schedule!r}; use none, linear, log or exp")
        self.temperature, self.threshold, self.lambda_u = temperature, threshold, lambda_u
        self.tsa_schedule = tsa_schedule

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        lb, ulb = batch["lb"], batch["ulb"]
        num_lb = lb["weak"].shape[0]
        logits = self.network(torch.cat([lb["weak"], ulb["weak"], ulb["strong"]]))
        logits_lb = logits[:num_lb]
        logits_weak, logits_strong = logits[num_lb:].chunk(2)

        progress = self.global_step / max(1, self.trainer.estimated_stepping_batches)
        tsa = tsa_threshold(self.tsa_schedule, progress, logits.shape[-1])
        sup_loss, sup_kept = tsa_supervised_loss(logits_lb, lb["label"], tsa)
        targets = sharpened_targets(logits_weak, self.temperature)
        mask = confidence_mask(logits_weak, self.threshold)
        unsup_loss = kl_consistency_loss(logits_strong, targets, mask)
        loss = sup_loss + self.lambda_u * unsup_loss

        # the unlabeled stream's true labels are used for this diagnostic only, never for training
        correct = (targets.argmax(dim=-1) == ulb["label"]).float()
        self.log_dict({"train/loss": loss, "train/sup_loss": sup_loss, "train/unsup_loss": unsup_loss,
                       "train/mask_ratio": mask.mean(), "train/tsa_threshold": tsa,
                       "train/sup_trained_ratio": sup_kept.mean(),
                       "train/pseudo_label_acc": (correct * mask).sum() / mask.sum().clamp_min(1)},
                      prog_bar=False, sync_dist=False)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> dict:
        return self.classifier_validation_step(batch)
