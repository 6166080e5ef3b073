"""The baselines: ERM (DomainBed's ``ERM``: cross-entropy on the pooled domain-balanced batch) and, on the same
trained network, Tent (Wang et al., ICLR 2021; official ``DequanWang/tent``, ``tent.py``).

Tent at test time: BatchNorm normalises with the test batch's statistics (running statistics dropped), only the
BatchNorm affine parameters are trainable, and each test batch takes one optimiser step on the mean prediction
entropy ``H(p) = -sum_c p_c log p_c``; the batch's predictions are those of the forward pass that computed the
loss (``forward_and_adapt`` returns its ``outputs``). Adam, lr 1e-3 (Tent's ``cfgs/tent.yaml``). The adapted
network is a copy, started afresh for each evaluation set, so training never sees it.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import DomainGeneralizationModule

__all__ = ["ERM", "Tent", "prediction_entropy"]


def prediction_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-sample entropy of the softmax, from log-probabilities (float32)."""
    log_p = logits.float().log_softmax(1)
    return -(log_p.exp() * log_p).sum(1)


class Tent:
    """A copy of ``network`` adapted by entropy minimisation, one step per batch on BatchNorm's affine parameters."""

    def __init__(self, network: nn.Module, lr: float):
        self.network = copy.deepcopy(network).eval()
        self.network.requires_grad_(False)
        norms = [m for m in self.network.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if not norms:
            raise ValueError("Tent adapts BatchNorm layers; the network has none")
        params = []
        for m in norms:  # tent.configure_model: batch statistics, no running estimates
            m.train()
            m.track_running_stats, m.running_mean, m.running_var = False, None, None
            m.weight.requires_grad_(True)
            m.bias.requires_grad_(True)
            params += [m.weight, m.bias]
        self.optimizer = torch.optim.Adam(params, lr=lr)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.network(x).float()
        loss = prediction_entropy(logits).mean()
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return logits.detach()


class ERM(DomainGeneralizationModule):
    """ERM; its test-time-adapted predictions (``val/tta_acc``) are Tent's.

    Args:
        network: a :class:`~zoo.itta.networks.StagedResNet` (any classifier with BatchNorm works).
        tent_lr: Tent's Adam learning rate (Tent's CIFAR configuration: 1e-3).
        Other arguments: :class:`~zoo.itta.base.DomainGeneralizationModule` / :class:`~zoo.core.module.ZooModule`.
    """

    def __init__(self, network: nn.Module, tent_lr: float = 1e-3, **base):
        super().__init__(network, **base)
        self.tent_lr = tent_lr
        self.tent: Tent | None = None

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits = self.network(batch["image"]).float()  # upcast under bf16
        loss = F.cross_entropy(logits, batch["label"])
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def reset_adaptation(self) -> None:
        self.tent = Tent(self.network, self.tent_lr)

    def adapted_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.tent(x)
