"""COMET's four contrastive losses (Wang et al., NeurIPS 2023), written from ``models/losses.py`` of DL4mHealth/COMET
(commit a769779). ``z1``, ``z2``: two views' per-timestamp representations ``(B, T, D)``.

- observation level: TS2Vec's temporal loss, timestamp t of view 1 against every other timestamp of the same sample
  in both views; positives are the same timestamp in the other view;
- sample level: TS2Vec's instance loss, at every timestamp sample i against the other samples of the batch;
- both hierarchical: averaged over max-pooled copies halving T while T > 1 (COMET stops before T = 1, TS2Vec does not);
- trial / patient level: windows sharing an id are positives (pairs i != j across the two views, the same window in
  the other view is *not* one), cosine similarity of the flattened representations at temperature 0.1. The official
  code first L2-normalises each feature over *time* (``normalize(z, dim=1)``), and so do we.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["hierarchical", "observation_loss", "sample_loss", "id_loss"]


def _two_view_nce(z: torch.Tensor, n: int) -> torch.Tensor:
    """``z``: ``(G, 2n, D)``; within each of the G groups, item i's positive is item i +- n, its negatives the other
    2n - 2 items (itself excluded). Mean over items and groups of -log softmax of the positive."""
    sim = z @ z.transpose(1, 2)  # G x 2n x 2n
    self_pair = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    log_prob = sim.masked_fill(self_pair, float("-inf")).log_softmax(-1)
    i = torch.arange(n, device=z.device)
    return -(log_prob[:, i, n + i].mean() + log_prob[:, n + i, i].mean()) / 2


def sample_loss(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """Instance contrast at each timestamp (``sample_contrastive_loss``); 0 for a batch of one."""
    if z1.shape[0] == 1:
        return z1.new_zeros(())
    return _two_view_nce(torch.cat([z1, z2]).transpose(0, 1), z1.shape[0])


def observation_loss(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """Timestamp contrast within each sample (``observation_contrastive_loss``); 0 for one timestamp."""
    if z1.shape[1] == 1:
        return z1.new_zeros(())
    return _two_view_nce(torch.cat([z1, z2], 1), z1.shape[1])


def hierarchical(loss_fn, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """``contrastive_loss(..., hierarchical=True)`` without its factor: the mean of ``loss_fn`` over T, T//2, ...
    (max-pooling pairs of timestamps) for as long as T > 1."""
    losses = []
    while z1.shape[1] > 1:
        losses.append(loss_fn(z1, z2))
        z1 = F.max_pool1d(z1.transpose(1, 2), 2).transpose(1, 2)
        z2 = F.max_pool1d(z2.transpose(1, 2), 2).transpose(1, 2)
    return torch.stack(losses).mean()


def id_loss(z1: torch.Tensor, z2: torch.Tensor, ids: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Trial- or patient-level contrast (``id_contrastive_loss``). ``S[i, j] = cos(view1_i, view2_j) / temperature``
    over the flattened, time-normalised representations; for every pair i != j with the same id, -log of its share
    of row i's sum (pairs above the diagonal) or of column j's sum (pairs below it); the two triangles' means are
    averaged. 0 when no two windows of the batch share an id."""
    v1 = F.normalize(z1, dim=1).flatten(1)
    v2 = F.normalize(z2, dim=1).flatten(1)
    log_sim = F.normalize(v1, dim=1) @ F.normalize(v2, dim=1).T / temperature
    same = ids[:, None] == ids[None, :]
    upper, lower = same.triu(1), same.tril(-1)
    terms = []
    if upper.any():  # row i's positive j > i, against everything in row i
        terms.append(-(log_sim - log_sim.logsumexp(1, keepdim=True))[upper].mean())
    if lower.any():  # row i's positive j < i, against everything in column j
        terms.append(-(log_sim - log_sim.logsumexp(0, keepdim=True))[lower].mean())
    return torch.stack(terms).mean() if terms else z1.new_zeros(())
