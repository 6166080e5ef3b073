"""FixMatch: Simplifying Semi-Supervised Learning with Consistency and Confidence (Sohn et al., NeurIPS 2020).

For each unlabeled image, the prediction on a weakly augmented view becomes a hard pseudo-label when its
confidence reaches ``threshold``; the network is trained to predict that label on a strongly augmented view:

    loss = CE(labeled) + lambda_u * mean_over_all_unlabeled( 1[max p_weak >= threshold] * CE(strong, argmax p_weak) )

Matches the official code (google-research/fixmatch) and USB's port (microsoft/Semi-supervised-learning,
``algorithms/fixmatch``): the mask uses ``>=`` on the un-tempered softmax; the masked loss is averaged over
*all* uratio*B unlabeled samples; labeled, weak and strong views go through one forward pass (BatchNorm sees
all of them); the weak logits are detached (no separate no-grad pass); evaluation uses the EMA (0.999) model.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from zoo.core.module import ZooModule

__all__ = ["FixMatch", "pseudo_labels", "masked_consistency_loss"]


def pseudo_labels(logits_weak: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Hard pseudo-labels and their confidence mask (1.0 where ``max softmax >= threshold``)."""
    probs = torch.softmax(logits_weak.detach().float(), dim=-1)
    confidence, labels = probs.max(dim=-1)
    return labels, (confidence >= threshold).float()


def masked_consistency_loss(logits_strong: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cross-entropy to the pseudo-labels, zeroed where masked, averaged over all unlabeled samples."""
    return (F.cross_entropy(logits_strong.float(), labels, reduction="none") * mask).mean()


class FixMatch(ZooModule):
    """FixMatch. Defaults are the paper's CIFAR-10 setting (WRN-28-2, SGD-nesterov, cosine to 7pi/16, EMA 0.999).

    Args:
        network: classifier with ``classifier.out_features`` classes.
        threshold: confidence threshold tau for pseudo-labels (0.95).
        lambda_u: weight of the unlabeled loss (1.0).
        The optimisation arguments are the base's (see ``ZooModule``), with the paper's values as defaults.
    """

    def __init__(self, network: nn.Module, threshold: float = 0.95, lambda_u: float = 1.0, **base):
        super().__init__(network, **base)
        self.threshold, self.lambda_u = threshold, lambda_u

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        lb, ulb = batch["lb"], batch["ulb"]
        num_lb = lb["weak"].shape[0]
        logits = self.network(torch.cat([lb["weak"], ulb["weak"], ulb["strong"]]))
        logits_lb = logits[:num_lb]
        logits_weak, logits_strong = logits[num_lb:].chunk(2)

        sup_loss = F.cross_entropy(logits_lb.float(), lb["label"])
        labels, mask = pseudo_labels(logits_weak, self.threshold)
        unsup_loss = masked_consistency_loss(logits_strong, labels, mask)
        loss = sup_loss + self.lambda_u * unsup_loss

        # the unlabeled stream's true labels are used for this diagnostic only, never for training
        correct = (labels == ulb["label"]).float()
        self.log_dict({"train/loss": loss, "train/sup_loss": sup_loss, "train/unsup_loss": unsup_loss,
                       "train/mask_ratio": mask.mean(),
                       "train/pseudo_label_acc": (correct * mask).sum() / mask.sum().clamp_min(1)},
                      prog_bar=False, sync_dist=False)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> dict:
        return self.classifier_validation_step(batch)
