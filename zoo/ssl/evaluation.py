"""Judging a representation without training it: weighted kNN, RankMe, and an online linear probe, computed on the
validation schedule from features of the whole evaluation splits.

Pure functions (reusable on any feature bank, e.g. ``zoo/ssl/bank.py``):

- :func:`weighted_knn_predict` / :func:`knn_accuracy`: the weighted kNN of InstDisc (Wu et al. 2018) as DINO's
  ``knn_classifier`` runs it: cosine similarity of L2-normalised features, the k = 20 most similar bank entries
  each voting for its label with weight ``exp(sim / 0.07)``;
- :func:`rankme`: RankMe (Garrido et al. 2023), ``exp(entropy(p))`` of the L1-normalised singular values
  ``p_k = sigma_k / sum(sigma) + 1e-7`` of the N x D embedding matrix, without centering;

and the pieces a host uses on the validation schedule:

- :class:`OnlineLinearProbe`: a linear classifier trained inside ``training_step`` on *detached* backbone features
  (SimCLR's ``lineareval_while_pretraining``; its gradient reaches only the probe);
- :class:`FeatureStore`: collects (index, label, features) per split over the validation loop and gathers them from
  every rank, each sample once (``DistributedSampler`` pads the shards with repeats);
- :func:`evaluate_representation`: the metrics from the gathered splits.

The splits come from ``SSLDataModule.val_dataloader`` in the order of ``EVAL_SPLITS``: the labeled train split
un-augmented (the kNN bank) and the test split (the queries, the probe's test, RankMe's fixed held-out set). Every
rank computes the same numbers from the same gathered features, so the logged values need no further reduction.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from zoo.core.distributed import concat_all_gather

__all__ = ["EVAL_SPLITS", "weighted_knn_predict", "knn_accuracy", "rankme", "OnlineLinearProbe", "FeatureStore",
           "deduplicate", "evaluate_representation"]

EVAL_SPLITS = ("bank", "test")  # the validation loaders of SSLDataModule, in order


@torch.no_grad()
def weighted_knn_predict(queries: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor, num_classes: int,
                         k: int = 20, temperature: float = 0.07, chunk_size: int = 1024) -> torch.Tensor:
    """Class scores (Q, C) of a weighted kNN: each query's ``k`` most cosine-similar bank entries vote for their
    label with weight ``exp(similarity / temperature)`` (InstDisc; DINO's ``knn_classifier``). ``argmax`` gives the
    prediction. ``k`` is capped at the bank size. Queries are processed ``chunk_size`` at a time (memory)."""
    if bank.shape[0] != bank_labels.shape[0]:
        raise ValueError(f"bank has {bank.shape[0]} features but {bank_labels.shape[0]} labels")
    if queries.shape[1] != bank.shape[1]:
        raise ValueError(f"queries have dimension {queries.shape[1]}, the bank {bank.shape[1]}")
    k = min(k, bank.shape[0])
    bank = F.normalize(bank.float(), dim=1)
    scores = []
    for chunk in F.normalize(queries.float(), dim=1).split(chunk_size):
        similarity, neighbours = (chunk @ bank.T).topk(k, dim=1)
        votes = torch.zeros(chunk.shape[0], num_classes, device=chunk.device)
        scores.append(votes.scatter_add_(1, bank_labels[neighbours], (similarity / temperature).exp()))
    return torch.cat(scores)


def knn_accuracy(queries: torch.Tensor, query_labels: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor,
                 num_classes: int, k: int = 20, temperature: float = 0.07) -> float:
    """Top-1 accuracy of :func:`weighted_knn_predict`."""
    predictions = weighted_knn_predict(queries, bank, bank_labels, num_classes, k, temperature).argmax(dim=1)
    return (predictions == query_labels).float().mean().item()


@torch.no_grad()
def rankme(embeddings: torch.Tensor, eps: float = 1e-7) -> float:
    """RankMe of an N x D embedding matrix: ``exp(-sum_k p_k log p_k)`` with ``p_k = sigma_k / ||sigma||_1 + eps``
    over its singular values (Garrido et al. 2023, Eq. 1; no centering). In [1, min(N, D)] up to ``eps``: 1 for a
    rank-one matrix, N for an N x N orthogonal one. The SVD runs in float64."""
    if embeddings.ndim != 2 or min(embeddings.shape) == 0:
        raise ValueError(f"rankme takes a non-empty N x D matrix, got shape {tuple(embeddings.shape)}")
    singular_values = torch.linalg.svdvals(embeddings.double())
    p = singular_values / singular_values.sum() + eps
    return torch.exp(-(p * p.log()).sum()).item()


class OnlineLinearProbe(nn.Module):
    """A linear classifier on the backbone's features, trained alongside the SSL objective on *detached* features:
    its loss term sends gradient only into this layer, never into the encoder (``tests/test_ssl.py`` checks it)."""

    def __init__(self, num_features: int, num_classes: int):
        super().__init__()
        self.linear = nn.Linear(num_features, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(features.detach().float())

    def loss(self, features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-entropy on detached features, and the accuracy of these predictions (a training diagnostic)."""
        logits = self(features)
        return F.cross_entropy(logits, labels), (logits.argmax(dim=1) == labels).float().mean()


def deduplicate(idx: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Rows sorted by dataset index with each index kept once (the padding ``DistributedSampler`` adds repeats a
    few samples on some ranks)."""
    order = torch.argsort(idx, stable=True)
    idx = idx[order]
    first = torch.ones_like(idx, dtype=torch.bool)
    first[1:] = idx[1:] != idx[:-1]
    return (idx[first], *(t[order][first] for t in tensors))


class FeatureStore:
    """Per-batch (index, label, named features) of one evaluation split, gathered from every rank at the end."""

    def __init__(self):
        self.parts: dict[str, list[torch.Tensor]] = {}

    def add(self, idx: torch.Tensor, label: torch.Tensor, **features: torch.Tensor) -> None:
        for name, value in {"idx": idx, "label": label, **features}.items():
            self.parts.setdefault(name, []).append(value.detach().float() if value.is_floating_point()
                                                   else value.detach())

    def __bool__(self) -> bool:
        return bool(self.parts)

    def gathered(self) -> dict[str, torch.Tensor]:
        """Every rank's rows (each rank holds as many: ``DistributedSampler`` pads), sorted by index, once each."""
        names = list(self.parts)
        local = [torch.cat(self.parts[name]) for name in names]
        idx, *rest = deduplicate(*(concat_all_gather(t.contiguous()) for t in local))
        return dict(zip(names, (idx, *rest)))


@torch.no_grad()
def evaluate_representation(bank: dict[str, torch.Tensor], test: dict[str, torch.Tensor], probe: OnlineLinearProbe,
                            num_classes: int, knn_k: int = 20, knn_temperature: float = 0.07,
                            rankme_samples: int = 25600, rankme_eps: float = 1e-7) -> dict[str, float]:
    """``val/knn_acc`` (test queries against the bank's backbone features), ``val/linear_acc`` (the online probe on
    the test backbone features), ``val/rankme`` (the embedding the SSL loss uses) and ``val/rankme_backbone``, both
    on the first ``rankme_samples`` test samples in dataset order (a fixed held-out set)."""
    held_out = slice(0, rankme_samples)
    return {
        "val/knn_acc": knn_accuracy(test["backbone"], test["label"], bank["backbone"], bank["label"], num_classes,
                                    knn_k, knn_temperature),
        "val/linear_acc": (probe(test["backbone"]).argmax(dim=1) == test["label"]).float().mean().item(),
        "val/rankme": rankme(test["embedding"][held_out], rankme_eps),
        "val/rankme_backbone": rankme(test["backbone"][held_out], rankme_eps),
    }
