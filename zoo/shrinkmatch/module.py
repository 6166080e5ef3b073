"""ShrinkMatch: Shrinking Class Space for Enhanced Certainty in Semi-Supervised Learning (Yang et al., ICCV 2023).

FixMatch + distribution alignment (DA) for the *certain* unlabeled samples, plus a loss for the *uncertain* ones.
For an uncertain sample (max aligned probability < tau) the classes are sorted by weak-view probability and the
most confusing ones (ranks 2, 3, ...) are dropped until the top-1 class, renormalised over what is left, reaches
tau. The strong view is then trained, through an auxiliary head, to predict the top-1 class in that shrunk space:

    p        = DA(softmax(weak logits))      # divided by the mean of a FIFO of 32 batch-mean predictions
    L_certain = mean_B( 1[max p >= tau] * CE(strong logits, p) )                    # soft target (CIFAR code)
    c*        = min { c in 2..C-1 : p_(1) / (p_(1) + sum_{j>=c} p_(j)) >= tau }     # ranks 2..c*-1 are dropped
    L_shrink  = sum_{uncertain} max p * 1[c* found] * CE(aux logits on {1} U {c*..C}, rank 1) / B
    loss      = L_x + lambda_u * L_certain + EMA_0.999(certain ratio) * L_shrink

Max p and the certain-ratio EMA are the paper's two re-weighting principles. Follows the official CIFAR code
(LiheYoung/ShrinkMatch @ c4339b8, ``CIFAR/shrinkmatch.py`` and ``CIFAR/network/shrinkmatch.py``):

- DA pushes the current batch mean into the FIFO *before* dividing by the FIFO mean; an unfilled FIFO's zero
  rows only rescale the mean and cancel in the renormalisation. The batch mean is gathered over all ranks.
- The shrink loss is summed over uncertain samples and divided by *all* B unlabeled samples; a sample whose
  confidence never reaches tau (c* = C-1 kept) contributes zero. The search is vectorised, same semantics.
- The auxiliary head (Linear-BN-LeakyReLU(0.1) x2 -> C, hidden = d/4) sees the strong-view features only; its
  gradient flows into the backbone. The main head never sees the shrink loss.
- The certain-ratio EMA restarts from the current batch's ratio at the start of every epoch, as the official
  CIFAR loop does (``reset_certain_ratio_each_epoch=False`` keeps one EMA for the whole run, as the paper's text
  and the official STL-10/SVHN code do). The ratio is averaged over ranks, so it does not depend on the GPU count.

Differences, all minor: the EMA model is updated after the optimizer step (the official code updates it at the
start of the next forward); the auxiliary head's BatchNorm parameters get no weight decay (official: they do,
because its name filter looks for 'bn').
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from zoo.core.distributed import mean_over_ranks
from zoo.core.module import ZooModule

__all__ = ["ShrinkMatch", "auxiliary_head", "distribution_alignment", "certain_loss",
           "shrunk_class_space", "shrink_loss", "updated_certain_ratio"]


def auxiliary_head(in_features: int, num_classes: int, hidden_divisor: int = 4) -> nn.Sequential:
    hidden = in_features // hidden_divisor
    return nn.Sequential(nn.Linear(in_features, hidden), nn.BatchNorm1d(hidden), nn.LeakyReLU(0.1),
                         nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.LeakyReLU(0.1),
                         nn.Linear(hidden, num_classes))


@torch.no_grad()
def distribution_alignment(probs: torch.Tensor, queue: torch.Tensor, pointer: torch.Tensor) -> torch.Tensor:
    """Push the global batch-mean prediction into the FIFO ``queue`` (updated in place, as is ``pointer``), then
    divide ``probs`` by the FIFO mean and renormalise."""
    queue[int(pointer)] = mean_over_ranks(probs.mean(0))
    pointer.copy_((pointer + 1) % queue.shape[0])
    aligned = probs / queue.mean(0)
    return aligned / aligned.sum(dim=1, keepdim=True)


def certain_loss(logits_strong: torch.Tensor, probs: torch.Tensor, threshold: float,
                 soft_targets: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """CE between the strong view and the (aligned) weak prediction where ``max probs >= threshold``, averaged
    over all unlabeled samples; returns (loss, certain mask)."""
    mask = (probs.max(dim=1).values >= threshold).float()
    log_probs = F.log_softmax(logits_strong.float(), dim=1)
    targets = probs if soft_targets else F.one_hot(probs.argmax(dim=1), probs.shape[1]).float()
    return (-(targets * log_probs).sum(dim=1) * mask).mean(), mask


@torch.no_grad()
def shrunk_class_space(probs: torch.Tensor, threshold: float):
    """Per sample: the class order (descending ``probs``), the rank ``start`` from which classes are kept again
    (ranks ``1..start-1`` are dropped; 0-based, top-1 is rank 0), the top-1 confidence renormalised over the kept
    classes, and whether it reached ``threshold``. ``start`` is the smallest of ``2..C-1`` that reaches it, else C-1.
    """
    num_classes = probs.shape[1]
    sorted_probs, order = probs.topk(num_classes, dim=1, sorted=True)
    top1 = sorted_probs[:, :1]
    tail_mass = sorted_probs.flip(1).cumsum(1).flip(1)  # tail_mass[:, c] = sum of ranks c..C-1
    sub_conf = top1 / (top1 + tail_mass[:, 2:])  # candidate starts c = 2..C-1, increasing in c
    reached = sub_conf >= threshold
    start = torch.where(reached.any(dim=1), reached.float().argmax(dim=1) + 2, num_classes - 1)
    return order, start, sub_conf.gather(1, (start - 2)[:, None]).squeeze(1), reached.any(dim=1)


def shrink_loss(probs: torch.Tensor, logits_aux: torch.Tensor, threshold: float):
    """The uncertain loss per sample, already weighted by ``max probs * 1[shrunk confidence >= threshold]``
    (zero for certain samples); returns (per-sample loss, start rank, shrunk confidence, uncertain mask).
    The official normalisation is ``per_sample.sum() / B`` over *all* B unlabeled samples, i.e. ``.mean()``."""
    confidence = probs.max(dim=1).values
    order, start, sub_conf, reached = shrunk_class_space(probs, threshold)
    sorted_logits = logits_aux.float().gather(1, order)
    ranks = torch.arange(probs.shape[1], device=probs.device)
    dropped = (ranks >= 1) & (ranks < start[:, None])
    ce = torch.logsumexp(sorted_logits.masked_fill(dropped, float("-inf")), dim=1) - sorted_logits[:, 0]
    uncertain = confidence < threshold
    return ce * confidence * reached * uncertain, start, sub_conf, uncertain


def updated_certain_ratio(ema: torch.Tensor, ratio: torch.Tensor, decay: float, restart: bool) -> torch.Tensor:
    """Loss re-weighting principle 2: EMA of the certain-sample ratio, started from the current ratio."""
    return ratio.clone() if restart else ema * decay + ratio * (1 - decay)


class ShrinkMatch(ZooModule):
    """ShrinkMatch. Defaults are the paper's CIFAR setting (the official ``--DA`` run).

    Args:
        network: backbone with ``features(x)``, ``num_features`` and ``classifier``.
        threshold: tau, for both the certain mask and the shrunk-space search (0.95).
        lambda_u: weight of the certain loss (1.0).
        distribution_alignment: divide weak predictions by the FIFO mean of batch-mean predictions (True).
        da_queue_length: FIFO length of the distribution alignment (32).
        soft_targets: certain loss against the aligned probabilities (True, CIFAR code) or their argmax
            (False, the official STL-10/SVHN code).
        certain_ratio_decay: EMA decay of the certain ratio that scales the shrink loss (0.999).
        reset_certain_ratio_each_epoch: restart that EMA at each epoch, as the official CIFAR loop does (True).
        aux_hidden_divisor: hidden width of the auxiliary head = ``num_features // aux_hidden_divisor`` (4).
        The optimisation arguments are the base's, with the official CIFAR-10 values as defaults.
    """

    # Parameters whose gradient is exactly zero until the method's gate opens: the aux head learns only once some
    # samples are certain (certain-ratio EMA > 0) and some uncertain ones reach tau in a shrunk space, which does
    # not happen at initialisation (the official code needs DDP's find_unused_parameters for the same reason).
    zero_grad_parameters = ("aux_head.",)

    def __init__(self, network: nn.Module, threshold: float = 0.95, lambda_u: float = 1.0,
                 distribution_alignment: bool = True, da_queue_length: int = 32, soft_targets: bool = True,
                 certain_ratio_decay: float = 0.999, reset_certain_ratio_each_epoch: bool = True,
                 aux_hidden_divisor: int = 4, **base):
        super().__init__(network, **base)
        self.threshold, self.lambda_u = threshold, lambda_u
        num_classes = network.classifier.out_features
        self.aux_head = auxiliary_head(network.num_features, num_classes, aux_hidden_divisor)
        self.use_da, self.soft_targets = distribution_alignment, soft_targets
        self.certain_ratio_decay, self.reset_certain_ratio_each_epoch = certain_ratio_decay, reset_certain_ratio_each_epoch
        # state that must survive a resume, so it lives in buffers (saved in every checkpoint)
        self.register_buffer("da_queue", torch.zeros(da_queue_length, num_classes))
        self.register_buffer("da_pointer", torch.zeros((), dtype=torch.long))
        self.register_buffer("certain_ratio_ema", torch.zeros(()))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        lb, ulb = batch["lb"], batch["ulb"]
        num_lb, num_ulb = lb["weak"].shape[0], ulb["weak"].shape[0]
        features = self.network.features(torch.cat([lb["weak"], ulb["weak"], ulb["strong"]]))
        logits = self.network.classifier(features)
        logits_aux = self.aux_head(features[num_lb + num_ulb:])  # strong views only
        logits_weak, logits_strong = logits[num_lb:].chunk(2)

        sup_loss = F.cross_entropy(logits[:num_lb].float(), lb["label"])
        probs = torch.softmax(logits_weak.detach().float(), dim=1)
        if self.use_da:
            probs = distribution_alignment(probs, self.da_queue, self.da_pointer)
        unsup_loss, mask = certain_loss(logits_strong, probs, self.threshold, self.soft_targets)
        per_sample, start, _, uncertain = shrink_loss(probs, logits_aux, self.threshold)
        shrink = per_sample.mean()

        restart = self.global_step == 0 or (self.reset_certain_ratio_each_epoch
                                            and self.global_step % self.trainer.num_training_batches == 0)
        self.certain_ratio_ema.copy_(updated_certain_ratio(self.certain_ratio_ema, mean_over_ranks(mask.mean()),
                                                           self.certain_ratio_decay, restart))
        loss = sup_loss + self.lambda_u * unsup_loss + self.certain_ratio_ema * shrink

        # the unlabeled stream's true labels are used for this diagnostic only, never for training
        correct = (probs.argmax(dim=1) == ulb["label"]).float()
        num_uncertain = uncertain.sum().clamp_min(1)
        self.log_dict({"train/loss": loss, "train/sup_loss": sup_loss, "train/unsup_loss": unsup_loss,
                       "train/shrink_loss": shrink, "train/shrink_loss_weighted": self.certain_ratio_ema * shrink,
                       "train/mask_ratio": mask.mean(), "train/certain_ratio_ema": self.certain_ratio_ema,
                       "train/shrunk_start_rank": (start * uncertain).sum() / num_uncertain,
                       "train/pseudo_label_acc": (correct * mask).sum() / mask.sum().clamp_min(1)})
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> dict:
        return self.classifier_validation_step(batch)
