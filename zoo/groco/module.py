"""GroCo: Shvetsova, Petersen, Kukleva, Schiele & Kuehne, *Learning by Sorting: Self-supervised Learning with Group
Ordering Constraints*, ICCV 2023 (official code: github.com/ninatu/learning_by_sorting).

A contrastive objective that asks for an *ordering of groups* rather than a softmax: for every anchor view, all its
positives (the other views of its image) must be more similar to it than its hardest negatives (the most similar
views of other images). The scores ``[k negatives ascending, positives ascending]`` are already in the ground-truth
order; a differentiable sorting network (odd-even, Cauchy swaps; the ``diffsort`` package of the sorting networks'
authors, as the official code) turns them into a soft permutation matrix, and a binary cross-entropy asks each score
to land, with probability one, in the ranks of its own group (Sec. 3, Eq. 5-7).
"""
from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import diffsort
import torch
import torch.nn as nn
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn

from zoo.core.distributed import gather_with_grad, is_distributed, rank_and_world
from zoo.ssl.encoders import MLPHead
from zoo.ssl.hosts import SSLModule

__all__ = ["GroCo", "group_ordering_loss", "group_scores"]

# The official loss hard-codes these (losses/groco.py). It also passes ART lambda 0.25, which only diffsort's
# `logistic_phi` swaps read: with Cauchy swaps it has no effect, so it is not an argument here.
SORTING_NETWORK, SWAP_DISTRIBUTION = "odd_even", "cauchy"


@lru_cache(maxsize=None)
def _sorting_network(size: int, device: torch.device) -> list:
    """diffsort's odd-even network on ``size`` inputs (a list of small 0/1 matrices), built once per device."""
    return diffsort.get_sorting_network(SORTING_NETWORK, size, device)


def _cosine_to_all(anchors: torch.Tensor, keys: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(N, M) cosine similarities; each row divided by ``max(|row|, eps)`` (the official ``cosine_similatity``)."""
    def normalise(x):
        return x / x.norm(dim=1, keepdim=True).clamp_min(eps)

    return normalise(anchors) @ normalise(keys).T


def group_scores(anchors: torch.Tensor, positives: Sequence[torch.Tensor], topk_negatives: int = 10,
                 stop_gradient: bool = True, gather_negatives: bool = True) -> torch.Tensor:
    """Each anchor's scores in the ground-truth order: ``[k hardest negatives ascending, positives ascending]``.

    ``positives[j][i]`` is another view of anchor ``i``'s image. The negatives of anchor ``i`` are the *other
    anchors of the same view* in the (gathered, global) batch, as the official code: of those, the ``k`` most
    similar. ``stop_gradient`` (the official default) detaches positives and negatives: the gradient reaches only
    the anchor side of every similarity. Returns an (N, k + P) float32 tensor.
    """
    anchors = anchors.float()
    keys = [p.float() for p in positives]
    positive_scores = torch.stack([F.cosine_similarity(anchors, p.detach() if stop_gradient else p, dim=1, eps=1e-8)
                                   for p in keys], dim=1)
    negatives = gather_with_grad(anchors) if gather_negatives else anchors
    rank = rank_and_world()[0] if gather_negatives and is_distributed() else 0
    own = torch.arange(len(anchors), device=anchors.device) + rank * len(anchors)  # each anchor's row in negatives
    negative_scores = _cosine_to_all(anchors, negatives.detach() if stop_gradient else negatives)
    negative_scores = negative_scores.masked_fill(F.one_hot(own, len(negatives)).bool(), float("-inf"))
    hardest = negative_scores.topk(topk_negatives, dim=1).values.flip(1)  # topk is descending
    return torch.cat([hardest, positive_scores.sort(dim=1).values], dim=1)


def group_ordering_loss(scores: torch.Tensor, num_negatives: int, steepness: float = 1.0) -> torch.Tensor:
    """GroCo's loss on scores in the ground-truth order (:func:`group_scores`): the first ``num_negatives`` belong in
    the lowest ranks, the rest in the highest.

    The sorting network gives ``P[b, i, r]``, the probability that score ``i`` goes to rank ``r``. The mass of each
    score on the positive ranks, ``sum_{r >= k} P[b, i, r]``, is compared with its group (1 for a positive, 0 for a
    negative) by a binary cross-entropy averaged over all scores, and likewise the mass on the negative ranks; the
    loss is the mean of the two (the official ``compute_loss``; the two terms are equal up to the clipping, since
    each row of ``P`` sums to one). Computed in float32 outside autocast.
    """
    with torch.autocast(device_type=scores.device.type, enabled=False):
        scores = scores.float()
        _, permutation = diffsort.sort(_sorting_network(scores.shape[1], scores.device), scores, steepness,
                                       distribution=SWAP_DISTRIBUTION)
        in_positive_group = torch.arange(scores.shape[1], device=scores.device) >= num_negatives
        target = in_positive_group.float().expand_as(scores)
        # clipped as the official code: sums of soft-permutation entries can exceed [0, 1] by rounding
        on_positive_ranks = permutation[:, :, num_negatives:].sum(dim=2).clamp(0, 1)
        on_negative_ranks = permutation[:, :, :num_negatives].sum(dim=2).clamp(0, 1)
        return (F.binary_cross_entropy(on_positive_ranks, target)
                + F.binary_cross_entropy(on_negative_ranks, 1 - target)) / 2


class GroCo(SSLModule):
    """GroCo on the ssl family's host: every view through encoder + projector (one forward per view, so BatchNorm
    normalises each view's batch, as the official encoder), then each view in turn is the anchor of
    :func:`group_scores` + :func:`group_ordering_loss`; the loss is the mean over anchor views.

    Views: ``view1`` ... ``view<num_views>`` (full-size crops, each other's positives) and ``local_0`` ...
    ``local_<num_local_views - 1>`` (multi-crop: small crops are anchors, with all full-size views as positives,
    but never positives themselves: the official ``n_pos_augs``). The official 2-view runs use DINO's two global
    augmentations, the multi-crop runs add 6 crops of 96 px (``zoo.ssl.views.MultiView``).

    Args (defaults: the official ``configs/2views_100ep.yaml`` and ``losses/groco.py``):
        topk_negatives: hardest negatives per anchor, 10 (``topk_neg``). The sorting network sorts
            ``k + positives`` scores. A global batch with fewer than ``k`` other images uses all of them (with a
            warning; the official code would stop).
        steepness: the Cauchy swap's steepness, 1 (``steepness``).
        stop_gradient: detach positives and negatives, True (``stop_grad``).
        gather_negatives: take negatives from the global batch under DDP (the official ``GatherLayer``), True.
        num_views, num_local_views: 2 and 0 (``n_pos_augs`` and ``n_augs - n_pos_augs``; the multi-crop configs:
            2 and 6).
        projector_layers, projector_hidden_dim, projector_out_dim: 3 layers, hidden = the encoder's width
            (``None``), 2048 out (``RegularProjection``: Linear-BN-ReLU twice, then Linear and a BN without
            affine parameters).
        Host defaults changed: ``lr`` 24.0 = the official 0.75 x B / 32 at B = 1024 (``base_learning_rate`` with
        ``learning_rate_scaling: linear``, ``train.py``; the zoo's base takes the scaled rate), ``weight_decay``
        1e-6 (the base skips biases and norms, the official code decays every parameter); SGD momentum 0.9 without
        Nesterov and cosine to zero are the host's, as the official code's. Warm-up: 1 epoch, set
        ``warmup_steps`` in the experiment.
    """

    def __init__(self, network: nn.Module, topk_negatives: int = 10, steepness: float = 1.0,
                 stop_gradient: bool = True, gather_negatives: bool = True, num_views: int = 2,
                 num_local_views: int = 0, projector_layers: int = 3, projector_hidden_dim: int | None = None,
                 projector_out_dim: int = 2048, lr: float = 24.0, weight_decay: float = 1e-6, **host):
        super().__init__(network, lr=lr, weight_decay=weight_decay, **host)
        if num_views < 2 or topk_negatives < 1:  # every full-size anchor needs another full-size view as positive
            raise ValueError(f"GroCo needs two full-size views or more and one negative or more; got "
                             f"num_views={num_views}, topk_negatives={topk_negatives}")
        self.topk_negatives, self.steepness = topk_negatives, steepness
        self.stop_gradient, self.gather_negatives = stop_gradient, gather_negatives
        self.positive_views = tuple(f"view{i}" for i in range(1, num_views + 1))
        self.view_names = self.positive_views + tuple(f"local_{i}" for i in range(num_local_views))
        head = MLPHead(self.num_features, projector_hidden_dim or self.num_features, projector_out_dim,
                       num_layers=projector_layers, batch_norm=True)
        head.layers[-1].bias.requires_grad_(False)  # the BN after it removes it; frozen as the official projector
        self.projector = nn.Sequential(head, nn.BatchNorm1d(projector_out_dim, affine=False))

    def embedding(self, features: torch.Tensor) -> torch.Tensor:
        return self.projector(features)

    def negatives_per_anchor(self, local_batch: int) -> int:
        """``topk_negatives``, or every other image of the global batch when it has fewer."""
        available = local_batch * (rank_and_world()[1] if self.gather_negatives else 1) - 1
        if available < self.topk_negatives:
            rank_zero_warn(f"GroCo: the batch has {available} negatives per anchor, fewer than topk_negatives="
                           f"{self.topk_negatives}; using all {available}")
        return min(self.topk_negatives, available)

    def ssl_step(self, batch: dict):
        features = {name: self.network(batch[name]) for name in self.view_names}
        embeddings = {name: self.embedding(h) for name, h in features.items()}
        k = self.negatives_per_anchor(len(batch[self.view_names[0]]))
        losses, logs = [], {}
        for anchor in self.view_names:
            positives = [embeddings[name] for name in self.positive_views if name != anchor]
            scores = group_scores(embeddings[anchor], positives, k, self.stop_gradient, self.gather_negatives)
            losses.append(group_ordering_loss(scores, k, self.steepness))
            if not logs:  # diagnostics of the first anchor view, as the official log
                weakest_positive, hardest_negative = scores[:, k].detach(), scores[:, k - 1].detach()
                logs = {"positive_min_similarity": weakest_positive.mean(),
                        "negative_max_similarity": hardest_negative.mean(),
                        "ordered_fraction": (weakest_positive > hardest_negative).float().mean()}
        # the online probe reads the full-size views (the images it is evaluated on)
        return torch.stack(losses).mean(), [features[name] for name in self.positive_views], logs
