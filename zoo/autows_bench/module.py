"""The AutoWS end model: a small classifier trained on probabilistic labels with soft-label cross-entropy.

WRENCH's ``EndClassifierModel`` as AutoWS-Bench-101 configures it (``fwrench/utils/data_settings.py``): SGD,
lr 0.1, no weight decay, batch 256, 1000 steps, soft labels (``em_hard_labels=False``); backbone ``LENET`` for
images, and here WRENCH's ``MLP`` (one hidden layer of 100, ReLU) for feature vectors.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from zoo.core.module import ZooModule

__all__ = ["LeNet", "SoftLabelEndModel", "build_end_network", "soft_cross_entropy"]


def soft_cross_entropy(logits: torch.Tensor, soft_labels: torch.Tensor) -> torch.Tensor:
    """mean_i -sum_c q_ic log softmax(z_i)_c, in float32 (WRENCH's ``cross_entropy_with_probs``)."""
    return -(soft_labels.float() * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()


class LeNet(nn.Module):
    """WRENCH ``backbone.LENET`` on 28x28 grey images: conv5-tanh-avgpool x2, 256-120-84, tanh."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 6, 5), nn.Tanh(), nn.AvgPool2d(2), nn.Conv2d(6, 16, 5), nn.Tanh(),
                                      nn.AvgPool2d(2), nn.Flatten(), nn.Linear(256, 120), nn.Tanh(), nn.Linear(120, 84),
                                      nn.Tanh())
        self.classifier = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x.unsqueeze(1) if x.ndim == 3 else x))


class _MLP(nn.Module):
    def __init__(self, input_dim: int, num_classes: int, hidden: int):
        super().__init__()
        self.features = nn.Sequential(nn.Linear(input_dim, hidden), nn.ReLU())
        self.classifier = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def build_end_network(backbone: str, input_shape: tuple[int, ...], num_classes: int, hidden: int = 100) -> nn.Module:
    if backbone == "lenet":
        return LeNet(num_classes)
    return _MLP(math.prod(input_shape), num_classes, hidden)


class SoftLabelEndModel(ZooModule):
    """Args:
        backbone: ``lenet`` (28x28 inputs) or ``mlp`` (feature vectors).
        input_shape, num_classes: the data's (checked against the data module at fit start).
        hidden: MLP width (WRENCH default 100).
        lr: 0.1, plain SGD without momentum or weight decay, constant schedule (WRENCH ``EndClassifierModel``).
    """

    def __init__(self, backbone: Literal["lenet", "mlp"] = "lenet", input_shape: tuple[int, ...] = (28, 28),
                 num_classes: int = 10, hidden: int = 100, lr: float = 0.1, **base):
        base = {"optimizer": "sgd", "momentum": 0.0, "nesterov": False, "weight_decay": 0.0, "lr_schedule": "constant",
                "ema_decay": None, **base}
        super().__init__(build_end_network(backbone, tuple(input_shape), num_classes, hidden), lr=lr, **base)
        self.input_shape, self.num_classes = tuple(input_shape), num_classes

    def on_fit_start(self) -> None:
        data = self.trainer.datamodule
        if (tuple(data.input_shape), data.num_classes) != (self.input_shape, self.num_classes):
            raise ValueError(f"the model is set for inputs {self.input_shape} and {self.num_classes} classes; the data "
                             f"has {tuple(data.input_shape)} and {data.num_classes} (set model.init_args)")

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = soft_cross_entropy(self.network(batch["features"]), batch["soft_label"])
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.classifier_validation_step({"image": batch["features"], "label": batch["label"]})
