"""SimMatchV2's graph consistencies, pseudo-labels and memory-bank updates as pure torch functions.

They import only torch and the zoo's collectives, so the parity tests and the 2-process bank test call them without Lightning. Each one
mirrors a piece of the official ``models/simmatchv2.py`` / ``main.py`` (see ``module.py`` for where).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from zoo.core.distributed import concat_all_gather

__all__ = ["distribution_alignment", "graph_pseudo_labels", "node_node_loss", "edge_edge_loss",
           "node_edge_loss", "update_labeled_bank", "update_unlabeled_bank", "finite_or_zero", "batch_statistics"]


@torch.no_grad()
def distribution_alignment(probs: torch.Tensor, running_mean: torch.Tensor,
                           momentum: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``probs / running_mean`` renormalised, and the running mean updated with the global batch mean."""
    aligned = probs / running_mean
    aligned = aligned / aligned.sum(dim=1, keepdim=True)
    batch_mean = concat_all_gather(probs).mean(dim=0, keepdim=True)
    return aligned, running_mean * momentum + batch_mean * (1 - momentum)


@torch.no_grad()
def graph_pseudo_labels(feat_u: torch.Tensor, probs_u: torch.Tensor, labeled_bank: torch.Tensor,
                        labeled_onehot: torch.Tensor, topn: int, temperature: float, alpha: float) -> torch.Tensor:
    """Label propagation on each unlabeled node's graph with its ``topn`` nearest labeled-bank nodes."""
    nearest = (feat_u @ labeled_bank.T).topk(topn, dim=1).indices                      # [B, n]
    nodes = torch.cat([feat_u[:, None], labeled_bank[nearest]], dim=1)                 # [B, n+1, D]
    labels = torch.cat([probs_u[:, None], labeled_onehot[nearest]], dim=1)             # [B, n+1, C]
    eye = torch.eye(topn + 1, device=feat_u.device, dtype=feat_u.dtype)
    affinity = torch.softmax(nodes @ nodes.transpose(1, 2) / temperature - eye * 1e9, dim=-1)
    propagation = (1 - alpha) * torch.linalg.inv(eye - alpha * affinity)
    return (propagation @ labels)[:, 0]


def node_node_loss(logits_strong: torch.Tensor, pseudo_labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Soft cross-entropy to the propagated labels, zeroed where masked, averaged over all unlabeled views."""
    return ((-F.log_softmax(logits_strong, dim=1) * pseudo_labels).sum(dim=1) * mask).mean()


def edge_edge_loss(feat_student: torch.Tensor, feat_teacher: torch.Tensor, unlabeled_bank: torch.Tensor,
                   temperature: float) -> torch.Tensor:
    """CE from the teacher's to the student's similarity distribution over the unlabeled bank."""
    relation_teacher = torch.softmax(feat_teacher @ unlabeled_bank.T / temperature, dim=1)
    relation_student = torch.softmax(feat_student @ unlabeled_bank.T / temperature, dim=1)
    return (-relation_student.log() * relation_teacher.detach()).sum(dim=1).mean()


def node_edge_loss(feat_student: torch.Tensor, probs_teacher: torch.Tensor, unlabeled_bank: torch.Tensor,
                   unlabeled_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """CE from the teacher's probabilities to the bank probabilities aggregated over the student's edges."""
    relation_student = torch.softmax(feat_student @ unlabeled_bank.T / temperature, dim=1)
    aggregated = relation_student @ unlabeled_probs
    return (-aggregated.log() * probs_teacher.detach()).sum(dim=1).mean()


@torch.no_grad()
def update_labeled_bank(bank: torch.Tensor, feats: torch.Tensor, indices: torch.Tensor) -> None:
    """Overwrite the rows of the labeled samples seen on any rank with their teacher embeddings."""
    bank[concat_all_gather(indices)] = concat_all_gather(feats).to(bank.dtype)


@torch.no_grad()
def update_unlabeled_bank(bank: torch.Tensor, bank_probs: torch.Tensor, ptr: torch.Tensor, feats: torch.Tensor,
                          probs: torch.Tensor) -> None:
    """FIFO write of every rank's embeddings and probabilities at ``ptr``; the bank holds whole global batches."""
    feats, probs = concat_all_gather(feats), concat_all_gather(probs)
    size, start = feats.shape[0], int(ptr)
    if bank.shape[0] % size:
        raise ValueError(f"unlabeled bank of {bank.shape[0]} rows does not hold whole batches of {size}")
    bank[start:start + size] = feats.to(bank.dtype)
    bank_probs[start:start + size] = probs.to(bank_probs.dtype)
    ptr.fill_((start + size) % bank.shape[0])


def finite_or_zero(loss: torch.Tensor) -> torch.Tensor:
    """The official guard: a NaN/Inf graph loss is dropped for the step (torch.where would leak NaN gradients)."""
    return loss if torch.isfinite(loss) else loss.new_zeros(())


@contextlib.contextmanager
def batch_statistics(module: nn.Module, enabled: bool = True):
    """Run ``module``'s BatchNorm layers on batch statistics (train mode) inside the block."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] if enabled else []
    for m in norms:
        m.train(True)
    try:
        yield
    finally:
        for m in norms:
            m.train(False)
