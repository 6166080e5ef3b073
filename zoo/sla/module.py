"""Self-supervised label augmentation (SLA; Lee, Hwang & Shin, ICML 2020; official code ``hankook/SLA``).

Every training image is shown in all M transformations of a self-supervised task (rotation by 0/90/180/270
degrees: M = 4) in the same batch, and the classifier learns ONE task over the joint labels ``(y, t) -> y*M + t``
(an N*M-way head), not a classification loss plus a rotation loss. Inference:

- SLA+SI (single): the identity transform's logits restricted to the joint classes ``{(y, 0)}``;
- SLA+AG (aggregation): the mean over t of the logit of class ``(y, t)`` on the t-th transformed image;
- SLA+SD (self-distillation): a separate N-way head on the untransformed image, trained with cross-entropy plus
  ``T^2 KL(softmax(aggregated / T) || softmax(single / T))`` (the aggregation detached as the teacher), so one
  forward pass gives the aggregation's accuracy.

The identity transformation (M = 1) without self-distillation is exactly plain cross-entropy training: the official
``baseline`` mode, with the same network, data and schedule.
"""
from __future__ import annotations

from typing import Callable, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from zoo.core.metrics import accuracy
from zoo.core.module import ZooModule

__all__ = ["SLA", "TRANSFORMATIONS", "aggregated_logits", "expand_batch", "joint_labels", "single_logits"]


def _rotations(quarter_turns: tuple[int, ...]) -> list[Callable[[torch.Tensor], torch.Tensor]]:
    return [lambda x, k=k: torch.rot90(x, k, (2, 3)) for k in quarter_turns]


def _channel_orders(orders: tuple[tuple[int, int, int], ...]) -> list[Callable[[torch.Tensor], torch.Tensor]]:
    return [lambda x, order=order: x[:, list(order)] for order in orders]


# the official ``augmentations.py`` transformation sets, in the official order (it fixes the joint label t)
TRANSFORMATIONS: dict[str, list[Callable[[torch.Tensor], torch.Tensor]]] = {
    "identity": _rotations((0,)),
    "rotation": _rotations((0, 1, 2, 3)),
    "rotation2": _rotations((0, 2)),
    "color_perm": _channel_orders(((0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0))),
    "color_perm3": _channel_orders(((0, 1, 2), (1, 2, 0), (2, 0, 1))),
}


def expand_batch(images: torch.Tensor, transforms: list[Callable]) -> torch.Tensor:
    """``(B, C, H, W) -> (B*M, C, H, W)``, sample-major: rows ``i*M .. i*M+M-1`` are image i's M transforms."""
    return torch.stack([t(images) for t in transforms], 1).flatten(0, 1)


def joint_labels(labels: torch.Tensor, num_transforms: int) -> torch.Tensor:
    """The label of row ``i*M + t`` of :func:`expand_batch`: ``y_i * M + t``."""
    return (labels[:, None] * num_transforms + torch.arange(num_transforms, device=labels.device)).flatten()


def single_logits(joint: torch.Tensor, num_transforms: int) -> torch.Tensor:
    """SLA+SI: the identity rows, joint classes ``(y, 0)``: ``(B*M, N*M) -> (B, N)``."""
    return joint[::num_transforms, ::num_transforms]


def aggregated_logits(joint: torch.Tensor, num_transforms: int) -> torch.Tensor:
    """SLA+AG: ``mean_t joint[i*M + t, y*M + t]``, an average of logits (not of probabilities): ``(B, N)``."""
    m = num_transforms
    return torch.stack([joint[t::m, t::m] for t in range(m)]).mean(0)


class SLA(ZooModule):
    """SLA on a classifier ``network`` with ``features(x)`` and ``classifier``, whose classifier has
    ``num_classes * M`` outputs (the joint head; the official code builds the same network with N*M classes).

    Args:
        num_classes: N, the original classes.
        transformation: a key of :data:`TRANSFORMATIONS` (paper: ``rotation``, M = 4; ``identity`` is the baseline).
        self_distillation: SLA+SD: add the N-way head and its distillation loss (official ``--mode sla+sd``).
        temperature: T of the distillation (official ``--T``, default 1).
        large_loss: multiply the joint loss by M (official ``--with-large-loss``, for ImageNet / iNaturalist).
        inference: the prediction logged as ``val/acc`` and returned by ``forward``: ``single_head`` (SLA+SD),
            ``aggregated`` (SLA+AG) or ``single`` (SLA+SI); default the single head with self-distillation, else
            the aggregation. All available ones are logged as ``val/{sd,ag,si}_acc``.
        Optimisation defaults are the official ``train.py``: SGD momentum 0.9 (not Nesterov), lr 0.1, weight decay
        1e-4 on every parameter, lr x0.1 at 50 % and 75 % of the steps, no EMA.
    """

    def __init__(self, network: nn.Module, num_classes: int, transformation: str = "rotation",
                 self_distillation: bool = False, temperature: float = 1.0, large_loss: bool = False,
                 inference: Literal["single_head", "aggregated", "single"] | None = None,
                 optimizer: str = "sgd", lr: float = 0.1, weight_decay: float = 1e-4, nesterov: bool = False,
                 lr_schedule: str = "step", decay_norm_and_bias: bool = True, ema_decay: float | None = None,
                 **base):
        super().__init__(network, optimizer=optimizer, lr=lr, weight_decay=weight_decay, nesterov=nesterov,
                         lr_schedule=lr_schedule, decay_norm_and_bias=decay_norm_and_bias, ema_decay=ema_decay,
                         **base)
        if transformation not in TRANSFORMATIONS:
            raise ValueError(f"unknown transformation {transformation!r}; use one of {sorted(TRANSFORMATIONS)}")
        self.transforms = TRANSFORMATIONS[transformation]
        self.num_transforms = m = len(self.transforms)
        joint_outputs = network.classifier.out_features
        if joint_outputs != num_classes * m:
            raise ValueError(f"the network's classifier has {joint_outputs} outputs; SLA with {transformation!r} "
                             f"needs num_classes x M = {num_classes} x {m} = {num_classes * m} (the joint head)")
        self.num_classes, self.temperature, self.large_loss = num_classes, temperature, large_loss
        self.single_head = nn.Linear(network.num_features, num_classes) if self_distillation else None
        inference = inference or ("single_head" if self_distillation else "aggregated")
        if inference == "single_head" and not self_distillation:
            raise ValueError("inference='single_head' needs self_distillation=True (the head exists only then)")
        self.inference_key = {"single_head": "sd", "aggregated": "ag", "single": "si"}[inference]

    # ------------------------------------------------------------------ the objective
    def joint_forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Features and joint logits (float32) of every transform of every image, sample-major."""
        features = self.network.features(expand_batch(images, self.transforms))
        return features, self.network.classifier(features).float()

    def losses(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        m = self.num_transforms
        features, joint = self.joint_forward(images)
        out = {"joint_loss": F.cross_entropy(joint, joint_labels(labels, m)) * (m if self.large_loss else 1)}
        out["loss"] = out["joint_loss"]
        if self.single_head is not None:
            single = self.single_head(features[::m]).float()  # the head sees the untransformed images only
            t = self.temperature
            teacher = F.softmax(aggregated_logits(joint, m).detach() / t, 1)
            out["single_loss"] = F.cross_entropy(single, labels)
            out["distillation_loss"] = F.kl_div(F.log_softmax(single / t, 1), teacher, reduction="batchmean") * t**2
            out["loss"] = out["loss"] + out["single_loss"] + out["distillation_loss"]
        return out

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        labeled = batch["lb"]
        out = self.losses(labeled["weak"], labeled["label"])
        self.log_dict({f"train/{name}": value for name, value in out.items()})
        return out["loss"]

    # ------------------------------------------------------------------ inference
    def predictions(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """N-way logits of each inference mode: ``si``, ``ag`` and (with self-distillation) ``sd``."""
        m = self.num_transforms
        features, joint = self.joint_forward(images)
        out = {"si": single_logits(joint, m), "ag": aggregated_logits(joint, m)}
        if self.single_head is not None:
            out["sd"] = self.single_head(features[::m]).float()
        return out

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.predictions(images)[self.inference_key]

    def setup(self, stage: str) -> None:
        if not hasattr(self, "val_acc"):
            modes = ("si", "ag", "sd") if self.single_head is not None else ("si", "ag")
            self.val_acc = accuracy(self.num_classes)
            self.mode_acc = nn.ModuleDict({mode: accuracy(self.num_classes) for mode in modes})

    def validation_step(self, batch: dict, batch_idx: int) -> dict:
        logits = self.predictions(batch["image"])
        for key, metric in self.mode_acc.items():
            metric(logits[key], batch["label"])
            self.log(f"val/{key}_acc", metric, on_epoch=True)
        chosen = logits[self.inference_key]
        self.val_acc(chosen, batch["label"])
        self.log("val/acc", self.val_acc, on_epoch=True, prog_bar=True)
        return {"preds": chosen.argmax(1)}
