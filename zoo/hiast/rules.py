"""HIAST's pure rules (torch only, so that spawned test workers import little): the instance adaptive selector,
the hard-class sampling and copy-paste, the region-adaptive losses. See ``module.py`` for where each follows the
official code."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from zoo.core.distributed import concat_all_gather
from zoo.segda.data import IGNORE

__all__ = ["ias_thresholds", "select_pseudo_labels", "update_class_values", "hard_classes_and_probabilities",
           "choose_paste_source", "hard_aware_copy_paste", "region_adaptive_losses", "gather_pixels"]


@torch.no_grad()
def ias_thresholds(thresholds: torch.Tensor, confidence: torch.Tensor, labels: torch.Tensor, alpha: float = 0.5,
                   beta: float = 0.9, gamma: float = 8.0, cap: float = 0.999) -> torch.Tensor:
    """One IAS update from a batch of teacher confidences and argmax labels (all pixels of the batch pooled)."""
    confidence, labels = confidence.flatten().half().double(), labels.flatten()  # the official float16 rounding
    quantiles = thresholds.clone().double()
    for c, theta in enumerate(thresholds.double()):
        samples = torch.cat([theta.view(1), confidence[labels == c]])  # the old threshold is one extra sample
        quantiles[c] = torch.quantile(samples, 1 - alpha * theta ** gamma)
    updated = beta * thresholds.double() + (1 - beta) * quantiles
    return updated.masked_fill(updated >= 1, cap).to(thresholds.dtype)


def select_pseudo_labels(confidence: torch.Tensor, labels: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Argmax labels with 255 where the confidence is below its predicted class's threshold."""
    return labels.masked_fill(confidence.double() < thresholds.double()[labels], IGNORE)


@torch.no_grad()
def update_class_values(values: torch.Tensor, confidence: torch.Tensor, pseudo_labels: torch.Tensor,
                        momentum: float = 0.99) -> torch.Tensor:
    """Per class: EMA of the mean confidence of the pixels kept as that class (a value of 0 is replaced directly)."""
    values = values.clone()
    for c in range(len(values)):
        kept = pseudo_labels == c
        if kept.any():
            mean = confidence[kept].double().mean().to(values.dtype)
            values[c] = mean if values[c] == 0 else momentum * values[c] + (1 - momentum) * mean
    return values


def hard_classes_and_probabilities(values: torch.Tensor, num_hard: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``num_hard`` lowest-value classes and, over them, the sampling probabilities ∝ (1 - value)^2 (the
    official rejection sampling over all classes until a hard one comes up gives exactly this distribution)."""
    hard = torch.argsort(values, stable=True)[:num_hard]
    weight = (1 - values[hard].double()) ** 2
    return hard, (weight / weight.sum() if weight.sum() > 0 else torch.full_like(weight, 1 / len(hard)))


def choose_paste_source(bank_labels: torch.Tensor, classes: torch.Tensor, probabilities: torch.Tensor,
                        drop_fraction: float = 0.1, generator: torch.Generator | None = None) -> int | None:
    """Draw a class among ``classes`` (∝ ``probabilities``, only classes some bank image holds), then a bank
    image uniformly among those holding it, after dropping the ``drop_fraction`` with the fewest of its pixels.
    None when no bank image holds any of the classes."""
    counts = (bank_labels.flatten(1).unsqueeze(1) == classes.view(1, -1, 1).to(bank_labels)).sum(-1)  # (N, K)
    weight = probabilities.double() * (counts > 0).any(0)
    if not len(bank_labels) or weight.sum() == 0:
        return None
    k = int(torch.multinomial(weight.cpu(), 1, generator=generator))
    holders = torch.nonzero(counts[:, k]).flatten()
    holders = holders[torch.argsort(counts[holders, k], stable=True)][round(len(holders) * drop_fraction):]
    return int(holders[torch.randint(len(holders), (1,), generator=generator)])


def hard_aware_copy_paste(image: torch.Tensor, label: torch.Tensor, bank_images: torch.Tensor,
                          bank_labels: torch.Tensor, hard: torch.Tensor, probabilities: torch.Tensor,
                          max_images: int = 1, drop_fraction: float = 0.1,
                          generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Paste *all* hard-class pixels of a drawn bank image onto ``image`` (C, H, W) and ``label`` (H, W), also
    over ignored pixels; with ``max_images`` > 1, repeat with the hard classes not pasted yet until half of them
    are (the paper's loop)."""
    pasted: set[int] = set()
    candidates = torch.ones(len(hard), dtype=torch.bool, device=hard.device)
    for _ in range(max_images):
        index = choose_paste_source(bank_labels, hard[candidates], probabilities[candidates], drop_fraction,
                                    generator)
        if index is None:
            break
        mask = torch.isin(bank_labels[index], hard)
        image, label = torch.where(mask, bank_images[index], image), torch.where(mask, bank_labels[index], label)
        pasted |= set(torch.unique(bank_labels[index][mask]).tolist())
        candidates = torch.tensor([c not in pasted for c in hard.tolist()], device=hard.device)
        if len(pasted) >= 0.5 * len(hard) or not candidates.any():
            break
    return image, label


def region_adaptive_losses(logits: torch.Tensor, pseudo_labels: torch.Tensor,
                           teacher_probs: torch.Tensor) -> dict[str, torch.Tensor]:
    """HIAST's four target terms (unweighted) with the official reductions; an empty region gives 0."""
    logits = logits.float()
    log_probs = F.log_softmax(logits, dim=1)
    labelled = pseudo_labels != IGNORE
    ignored = ~labelled
    num_classes, zero = logits.shape[1], logits.sum() * 0
    losses = {"ce": F.cross_entropy(logits, pseudo_labels, ignore_index=IGNORE) if labelled.any() else zero,
              "kl": (-log_probs.mean(1))[labelled].sum() / (num_classes * labelled.sum()) if labelled.any() else zero}
    if ignored.any():
        entropy = -(log_probs.exp() * log_probs).sum(1)
        losses["entropy"] = entropy[ignored].sum() / (num_classes * ignored.sum())
        soft_ce = -teacher_probs * log_probs * ignored.unsqueeze(1)
        losses["consistency"] = soft_ce.sum() / (soft_ce != 0).sum().clamp(min=1)
    else:
        losses["entropy"] = losses["consistency"] = zero
    return losses


def gather_pixels(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Every rank's tensors concatenated along the batch (identity without torch.distributed)."""
    return tuple(concat_all_gather(x) for x in tensors)