"""Preference-learning pieces shared by the DPO family (CREAM, plain self-rewarding, SCIR).

- :func:`dpo_loss`: per-pair DPO loss ``-log sigmoid(beta * Delta)`` with a soft label ``label`` in [0, 1]
  (CREAM's consistency rate: ``label * l(Delta) + (1 - label) * l(-Delta)``; 1 = plain DPO) and optional per-pair
  ``weights``; returns the losses and the implicit rewards.
- :func:`ordinal_ranks` (``scipy.stats.rankdata(method="ordinal")``: ties broken by position) and
  :func:`kendall_tau` over rank rows without ties; :func:`consistency_rate` = ``(tau + 1) / 2`` per prompt.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["dpo_loss", "ordinal_ranks", "kendall_tau", "consistency_rate"]


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
             reference_rejected: torch.Tensor, beta: float = 0.1, label: torch.Tensor | float = 1.0,
             weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses, chosen rewards and rejected rewards (rewards = ``beta * (log pi - log pi_ref)``)."""
    chosen_rewards = beta * (policy_chosen - reference_chosen)
    rejected_rewards = beta * (policy_rejected - reference_rejected)
    margin = chosen_rewards - rejected_rewards
    losses = label * -F.logsigmoid(margin) + (1 - label) * -F.logsigmoid(-margin)
    if weights is not None:
        losses = losses * weights
    return losses, chosen_rewards, rejected_rewards


def ordinal_ranks(scores: torch.Tensor) -> torch.Tensor:
    """Ranks 1..N along the last dimension; equal scores are ranked in order of appearance."""
    order = torch.argsort(scores, dim=-1, stable=True)
    return torch.argsort(order, dim=-1) + 1


def kendall_tau(ranks_a: torch.Tensor, ranks_b: torch.Tensor) -> torch.Tensor:
    """Kendall's tau between rank rows without ties: (concordant - discordant) / (N (N - 1) / 2)."""
    da = torch.sign(ranks_a.unsqueeze(-1) - ranks_a.unsqueeze(-2))
    db = torch.sign(ranks_b.unsqueeze(-1) - ranks_b.unsqueeze(-2))
    n = ranks_a.shape[-1]
    return (da * db).sum((-2, -1)).to(torch.float64) / (n * (n - 1))


def consistency_rate(scores_current: torch.Tensor, scores_previous: torch.Tensor) -> torch.Tensor:
    """CREAM's per-prompt consistency of two models' rankings of the same N responses, in [0, 1]."""
    return (kendall_tau(ordinal_ranks(scores_current), ordinal_ranks(scores_previous)) + 1) / 2
