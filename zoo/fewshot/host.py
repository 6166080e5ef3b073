"""The base-class classifier: the encoder of a few-shot method, trained with plain cross-entropy (no episodes)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from zoo.core.module import ZooModule

__all__ = ["BaseClassifier"]


class BaseClassifier(ZooModule):
    """Cross-entropy with ``label_smoothing`` on the base classes' batches (``batch["image"]``, ``batch["label"]``);
    ``val/acc``: top-1 on held-out base-class images. ``network`` needs ``features(x)`` (the penultimate layer the
    episodes are evaluated on) and ``classifier``."""

    def __init__(self, network: nn.Module, label_smoothing: float = 0.0, **base):
        super().__init__(network, **base)
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing={label_smoothing} must be in [0, 1)")
        self.label_smoothing = label_smoothing

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits = self.network(batch["image"]).float()  # float32 loss under bf16
        loss = F.cross_entropy(logits, batch["label"], label_smoothing=self.label_smoothing)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> dict:
        return self.classifier_validation_step(batch)

    def encoder(self) -> nn.Module:
        """The network whose ``features`` the episodes use: the EMA one when there is one."""
        return self.ema.module if self.ema is not None else self.network
