"""Shvetsova et al., *Learning by Sorting: Self-supervised Learning with Group Ordering Constraints* (GroCo, ICCV
2023): a contrastive objective in which a differentiable sorting network asks every positive to rank above the
hardest negatives, on the ssl family's host."""
from .module import GroCo, group_ordering_loss, group_scores

__all__ = ["GroCo", "group_ordering_loss", "group_scores"]
