"""Supervised baseline: the same network, data split and schedule as the semi-supervised methods, trained on the
labeled images only (set the data module's ``uratio: 0``). It is the number every SSL method must beat."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from zoo.core.module import ZooModule

__all__ = ["Supervised"]


class Supervised(ZooModule):
    def __init__(self, network: nn.Module, **base):
        super().__init__(network, **base)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        lb = batch["lb"]
        loss = F.cross_entropy(self.network(lb["weak"]).float(), lb["label"])
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> dict:
        return self.classifier_validation_step(batch)
