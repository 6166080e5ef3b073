"""Wang, He & Gupta, *Transitive Invariance for Self-supervised Visual Representation Learning* (ICCV 2017).

A Triplet-Siamese network trained with a ranking loss on positive pairs mined from a graph of video objects
(``zoo/transitive_invariance/data.py`` builds the pairs: intra-instance, inter-instance and transitive). The loss
is the one of the authors' earlier video work (Wang & Gupta, ICCV 2015), whose Caffe layer the paper reuses:
``RankHardLoss`` in github.com/xiaolonw/caffe-video_triplet (``src/caffe/layers/rank_hard_loss_layer.cpp``).

Network (official ``rank_scripts/rank_vgg/imagenet_train.prototxt``): the encoder, then ``fc6`` 4096 -> ReLU ->
``fc7`` 1024 -> ReLU -> L2 normalisation; the three towers share weights, so one forward of the batch of pairs
serves them all (the official "only one network in the prototxt").
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from zoo.ssl.hosts import SSLModule

__all__ = ["ranking_hard_loss", "select_negatives", "TransitiveInvariance"]


@torch.no_grad()
def select_negatives(similarity: torch.Tensor, labels: torch.Tensor, margin: float, negatives_per_pair: int,
                     hard_ratio: float, random_ratio: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """The official ``set_mask``: (P, 2P) boolean mask of the negatives each anchor ``2p`` is trained against.

    Candidates: images ``j`` of another label whose triplet ``(2p, 2p+1, j)`` violates the margin,
    ``m - s(2p, 2p+1) + s(2p, j) > 0`` (only the anchor's term decides). If there are at most
    ``negatives_per_pair`` of them, all are used; otherwise ``int(K * hard_ratio)`` are drawn at random among the K
    hardest (most similar) and ``int(K * random_ratio)`` at random among all the others (the rest of the hardest
    included).
    """
    num_pairs = similarity.shape[0] // 2
    anchors = torch.arange(0, 2 * num_pairs, 2, device=similarity.device)
    violation = margin - similarity[anchors, anchors + 1, None] + similarity[anchors]
    candidate = (labels[None, :] != labels[anchors, None]) & (violation > 0)
    mask = torch.zeros_like(candidate)
    num_hard, num_random = int(negatives_per_pair * hard_ratio), int(negatives_per_pair * random_ratio)
    for p in range(num_pairs):
        found = candidate[p].nonzero().flatten()
        if len(found) <= negatives_per_pair:
            mask[p, found] = True
            continue
        # hardest first (highest similarity = smallest distance; ties by index, as the official sort of pairs)
        ranked = found[torch.sort(-similarity[2 * p, found], stable=True).indices]
        hardest, others = ranked[:negatives_per_pair], ranked[negatives_per_pair:]
        shuffled = hardest[torch.randperm(len(hardest), generator=generator).to(hardest.device)]
        rest = torch.cat([others, shuffled[num_hard:]])
        rest = rest[torch.randperm(len(rest), generator=generator).to(rest.device)]
        mask[p, shuffled[:num_hard]] = True
        mask[p, rest[:num_random]] = True
    return mask


def ranking_hard_loss(embeddings: torch.Tensor, labels: torch.Tensor, margin: float = 0.5,
                      negatives_per_pair: int = 4, hard_ratio: float = 0.5, random_ratio: float = 0.5,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """The ranking loss with in-batch negatives (paper Eq. 1; official ``RankHardLossLayer``).

    ``embeddings`` (2P, D), L2-normalised, hold P positive pairs interleaved: rows ``2p`` (anchor X) and ``2p+1``
    (positive X+); ``labels`` (2P,) says which video each row comes from (no negative shares the anchor's). With the
    paper's distance ``D(u, v) = 1 - cos(u, v)`` and the negatives X- of :func:`select_negatives`::

        L = sum over pairs p and their negatives j of  max(0, D(X, X+) - D(X, X-) + M)
                                                     + max(0, D(X, X+) - D(X+, X-) + M)
        divided by 2 K P  (K = negatives_per_pair, whether or not K were found)

    The official code writes the distance as ``-u.v`` (the same differences) and also ranks the positive against
    each negative (the second term). Computed in float32 outside autocast.
    """
    if embeddings.ndim != 2 or embeddings.shape[0] % 2:
        raise ValueError(f"embeddings must be (2P, D) interleaved pairs, got {tuple(embeddings.shape)}")
    with torch.autocast(device_type=embeddings.device.type, enabled=False):
        z = embeddings.float()
        similarity = z @ z.T
        mask = select_negatives(similarity.detach(), labels, margin, negatives_per_pair, hard_ratio, random_ratio,
                                generator)
        num_pairs = z.shape[0] // 2
        anchors = torch.arange(0, 2 * num_pairs, 2, device=z.device)
        positive = similarity[anchors, anchors + 1, None]
        anchor_term = F.relu(margin - positive + similarity[anchors])
        positive_term = F.relu(margin - positive + similarity[anchors + 1])
        return ((anchor_term + positive_term) * mask).sum() / (2 * negatives_per_pair * num_pairs)


class TransitiveInvariance(SSLModule):
    """Triplet-Siamese ranking on graph-mined pairs (``TransitiveGraphDataModule``: views ``anchor``, ``positive``,
    the anchor's ``video``, and labeled probe images ``image`` / ``label`` of the evaluation set).

    The online probe of the host learns transfer classification on the probe images, encoded as validation
    encodes them (eval mode, no gradient): the encoder learns from the ranking loss alone, and its BatchNorm
    statistics from the video patches alone.

    Args:
        embedding_dims: widths of the Linear -> ReLU layers before the L2 normalisation (official fc6 4096, fc7 1024).
        margin: M of the ranking loss, 0.5 (the 2015 paper, Sec. 3.3; ``RankParameter``'s default). The official
            prototxts set ``margin: 1``.
        negatives_per_pair, hard_ratio, random_ratio: 4, 0.5, 0.5: the official prototxts' ``neg_num``,
            ``hard_ratio``, ``rand_ratio`` (2 of the 4 hardest violating negatives and 2 random violating ones).
        The other arguments are the host's (``SSLModule``).
    """

    view_names = ("anchor", "positive")

    def __init__(self, network: nn.Module, embedding_dims: tuple[int, ...] = (4096, 1024), margin: float = 0.5,
                 negatives_per_pair: int = 4, hard_ratio: float = 0.5, random_ratio: float = 0.5, **host):
        super().__init__(network, **host)
        self.margin, self.negatives_per_pair = margin, negatives_per_pair
        self.hard_ratio, self.random_ratio = hard_ratio, random_ratio
        layers, width = [], self.num_features
        for dim in embedding_dims:
            layers += [nn.Linear(width, dim), nn.ReLU(inplace=True)]
            width = dim
        self.head = nn.Sequential(*layers)

    def embedding(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(features).float(), dim=1)

    def ssl_step(self, batch: dict):
        # pairs interleaved (anchor, positive, anchor, ...), as the official data layer keeps them adjacent
        images = torch.stack([batch["anchor"], batch["positive"]], dim=1).flatten(0, 1)
        labels = batch["video"].repeat_interleave(2)
        loss = ranking_hard_loss(self.embedding(self.network(images)), labels, self.margin, self.negatives_per_pair,
                                 self.hard_ratio, self.random_ratio)
        return loss, [self.probe_features(batch["image"])], {}

    @torch.no_grad()
    def probe_features(self, images: torch.Tensor) -> torch.Tensor:
        self.network.eval()
        features = self.network(images)
        self.network.train()
        return features
