"""Supervised baseline: the same network, data split and schedule as the semi-supervised methods, trained on the
labeled images only (set the data module's ``uratio: 0``). It is the number every SSL method must beat."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from zoo.core.module import ZooModule

__all__ = ["Supervised"]


class Supervised(ZooModule):
    def __init__(self, network: nn.Module, optimizer: str = "sgd", lr: float = 0.03, weight_decay: float = 5e-4,
                 momentum: float = 0.9, nesterov: bool = True, warmup_steps: int = 0, lr_schedule: str = "cosine",
                 cosine_cycles: float = 7 / 16, ema_decay: float | None = 0.999, ema_buffers: str = "copy",
                 compile: bool = False):
        super().__init__(network, optimizer=optimizer, lr=lr, weight_decay=weight_decay, momentum=momentum,
                         nesterov=nesterov, warmup_steps=warmup_steps, lr_schedule=lr_schedule,
                         cosine_cycles=cosine_cycles, ema_decay=ema_decay, ema_buffers=ema_buffers, compile=compile)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        lb = batch["lb"]
        loss = F.cross_entropy(self.network(lb["weak"]).float(), lb["label"])
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> dict:
        return self.classifier_validation_step(batch)
