"""Retrieval evaluation: recall@K over the full item corpus, overall and on the long-tail item slice.

For each test user, every item is scored; the user's training positives are excluded (score -inf) and the rest
ranked. recall@K = |top-K ∩ test items| / |test items|, averaged over users with at least one test item (as
torchmetrics' ``RetrievalRecall`` with ``empty_target_action="skip"``). The tail slice ranks the same full corpus but
counts only the user's test items that are tail items (users without one are skipped).

Tail items (our definition; Yao et al. report tail slices of their proprietary data without a portable rule): the
least popular items that together hold ``tail_share`` (default 20 %) of the training interactions, items never seen
in training included; the head is the popular rest, the classic 80/20 split.
"""
from __future__ import annotations

import numpy as np
import torch
from torchmetrics import MeanMetric

__all__ = ["long_tail_items", "RecallAtK"]


def long_tail_items(item_counts: np.ndarray, tail_share: float = 0.2) -> np.ndarray:
    """(num_items,) bool: the least popular items whose training interactions add up to at most ``tail_share`` of
    all (ties broken by item index), plus every item without training interactions."""
    order = np.lexsort((np.arange(len(item_counts)), item_counts))  # ascending popularity
    cumulative = np.cumsum(item_counts[order])
    tail = np.zeros(len(item_counts), bool)
    tail[order[cumulative <= tail_share * item_counts.sum()]] = True
    return tail


class RecallAtK(torch.nn.Module):
    """``recall@K`` and ``tail_recall@K`` for every K, accumulated over batches of users.

    ``update(scores, train_positives, test_positives)`` with (B, num_items) scores and bool matrices; ``compute()``
    -> ``{"recall@10": ..., "tail_recall@10": ..., ...}``. Per-user recalls come from one ``topk`` per batch and are
    averaged by torchmetrics' ``MeanMetric`` (synchronised over processes); tests/test_ssl_two_tower_cfm.py checks
    them against ``torchmetrics.retrieval.RetrievalRecall``, which keeps every score until ``compute`` (1.6 M per
    evaluation on MovieLens-100k, 22 M on 1M)."""

    def __init__(self, tail_items: torch.Tensor, ks: tuple[int, ...] = (10, 50, 100)):
        super().__init__()
        self.register_buffer("tail_items", tail_items.bool(), persistent=False)
        self.ks = tuple(ks)
        self.means = torch.nn.ModuleDict({f"{prefix}recall@{k}": MeanMetric()
                                          for prefix in ("", "tail_") for k in self.ks})

    def update(self, scores: torch.Tensor, train_positives: torch.Tensor, test_positives: torch.Tensor) -> None:
        scores = scores.float().masked_fill(train_positives, float("-inf"))
        top = scores.topk(min(max(self.ks), scores.shape[1]), dim=1).indices
        for prefix, targets in (("", test_positives), ("tail_", test_positives & self.tail_items)):
            relevant = targets.sum(1)
            users = relevant > 0  # users without a (tail) test item are skipped
            hits = targets.gather(1, top).cumsum(1)
            for k in self.ks:
                recall = hits[:, min(k, top.shape[1]) - 1] / relevant.clamp(min=1)
                self.means[f"{prefix}recall@{k}"].update(recall[users].float())

    def compute(self) -> dict[str, torch.Tensor]:
        return {name: mean.compute() for name, mean in self.means.items()}

    def reset(self) -> None:
        for mean in self.means.values():
            mean.reset()
