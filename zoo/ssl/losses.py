"""The objectives of the family's hosts, as pure functions of embeddings, computed in float32.

- :func:`nt_xent_loss`: SimCLR's NT-Xent (normalised-temperature cross-entropy, an InfoNCE over 2N views);
- :func:`byol_loss`: BYOL's normalised MSE between a prediction and a target projection;
- :func:`byol_target_decay`: BYOL's cosine schedule of the target network's decay tau;

Every loss upcasts its inputs to float32 and runs outside autocast: under ``bf16-mixed`` the similarity matmuls
would otherwise run in bfloat16, and logits ``cos / 0.1`` in bf16 carry ~3 significant digits.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from zoo.core.distributed import gather_with_grad, is_distributed, rank_and_world

__all__ = ["nt_xent_loss", "byol_loss", "byol_target_decay"]


def _no_autocast(device: torch.device):
    return torch.autocast(device_type=device.type, enabled=False)


def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5,
                 gather_negatives: bool = True) -> torch.Tensor:
    """SimCLR's NT-Xent loss (Chen et al. 2020, Eq. 1), averaged over the 2N anchors of the (global) batch.

    ``z1[i]`` and ``z2[i]`` are the projections of two views of image ``i``. Each anchor's positive is the other view
    of its image; its negatives are the 2N - 2 views of the other images. With cosine similarities
    ``s(u, v) = u.v / (|u| |v|)``::

        l(i) = -log( exp(s(z_i, z_j) / t) / sum_{k != i} exp(s(z_i, z_k) / t) )       (j = the other view of i)
        L = mean over all 2N anchors of l

    Under DDP (``gather_negatives``), this rank's anchors are contrasted with the views of every rank
    (:func:`zoo.core.distributed.gather_with_grad`: gradients flow through the gathered negatives back to the ranks that computed them,
    so the update is that of the global-batch loss; SimCLR's official code does the same with a cross-replica sum).

    The official code (``objective.add_contrastive_loss``) returns ``loss_a + loss_b``, the sum of the two views'
    means: exactly twice this value. Computed in float32 outside autocast.
    """
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"z1 and z2 must both be (N, D), got {tuple(z1.shape)} and {tuple(z2.shape)}")
    with _no_autocast(z1.device):
        z1, z2 = F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1)
        keys1, keys2 = (gather_with_grad(z1), gather_with_grad(z2)) if gather_negatives else (z1, z2)
        n = z1.shape[0]
        rank = rank_and_world()[0] if gather_negatives and is_distributed() else 0
        own = torch.arange(n, device=z1.device) + rank * n  # each anchor's row among the gathered keys
        self_mask = F.one_hot(own, keys1.shape[0]).bool()

        def anchor_loss(anchors, same_view_keys, other_view_keys):
            positives_and_cross = anchors @ other_view_keys.T / temperature  # column `own` is the positive
            same_view = (anchors @ same_view_keys.T / temperature).masked_fill(self_mask, float("-inf"))
            return F.cross_entropy(torch.cat([positives_and_cross, same_view], dim=1), own)

        return 0.5 * (anchor_loss(z1, keys1, keys2) + anchor_loss(z2, keys2, keys1))


def byol_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BYOL's regression loss (Grill et al. 2020, Eq. 2): ``|q/|q| - z'/|z'||^2 = 2 - 2 cos(q, z')`` averaged over
    the batch. ``target`` (the target network's projection) is detached: no gradient reaches the target.

    BYOL's objective is symmetric, ``byol_loss(q1, z2') + byol_loss(q2, z1')``, as the official ``byol_loss``
    sums the two directions. Computed in float32 outside autocast."""
    if prediction.shape != target.shape:
        raise ValueError(f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ in shape")
    with _no_autocast(prediction.device):
        q = F.normalize(prediction.float(), dim=-1)
        z = F.normalize(target.detach().float(), dim=-1)
        return (2 - 2 * (q * z).sum(dim=-1)).mean()


def byol_target_decay(step: int, total_steps: int, tau_base: float = 0.996) -> float:
    """BYOL's target decay at step ``k`` of ``K``: ``1 - (1 - tau_base) (cos(pi k / K) + 1) / 2`` (Sec. 3.2):
    ``tau_base`` at the start, rising to 1 at the end of training."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    progress = min(max(step, 0), total_steps) / total_steps
    return 1 - (1 - tau_base) * (math.cos(math.pi * progress) + 1) / 2
