"""FerKD (Shen, ICCV 2023; official code ``szq0214/FKD``: ``FerKD/`` and the FKD trainer ``FKD/train_FKD.py``).

Fast knowledge distillation (FKD) labels every training image offline: R random-resized crops, each with the
teacher's top-k soft label (``zoo.ferkd.store``); the student trains on several stored crops per image per load
with the soft cross-entropy ``L = -sum_c q_c log softmax(z / T)_c``. FerKD changes which label a crop gets
("partial soft-hard label adaptation"): rank an image's R crops by the teacher's probability of the ground-truth
class p_t(y | crop),

- the easiest crops (top ``discard_easiest`` fraction: easy positives, little to learn) are discarded;
- the hardest (bottom ``calibrate_hardest`` fraction: hard negatives, mostly background, where the teacher's soft
  label is unreliable) are *calibrated*: their target becomes the softened ground truth
  ``q = (1 - eps) onehot(y) + eps / C``;
- the rest keep the teacher's soft label.

SelfMix ("stabilised" mixing): CutMix between two crops *of the same image*, so the pasted region and its label come
from similar content: ``x = M * x_i + (1 - M) * x_j``, ``q = lam q_i + (1 - lam) q_j`` with ``lam`` the exact kept
area and ``lam0 ~ Beta(alpha, alpha)``. Plain FKD/KD (all crops, teacher labels, no mixing) and training without a
teacher (hard labels on the same crops) are switches of this module and of the data module.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from zoo.core.metrics import accuracy
from zoo.core.module import ZooModule

from .store import recover_soft_label

__all__ = ["FerKD", "partition_crops", "crop_targets", "soft_cross_entropy", "selfmix", "DISCARD", "CALIBRATE",
           "TEACHER"]

TEACHER, CALIBRATE, DISCARD = 0, 1, 2  # what each stored crop is used for


def partition_crops(gt_prob: torch.Tensor, discard_easiest: float, calibrate_hardest: float) -> torch.Tensor:
    """FerKD's partition of every image's crops (``gt_prob``: ``(N, R)``, the teacher's probability of the true
    class per crop): the ``round(discard_easiest * R)`` most confident crops of each image are ``DISCARD``, the
    ``round(calibrate_hardest * R)`` least confident are ``CALIBRATE``, the others ``TEACHER``. Ties are broken by
    crop order (a stable sort), so the partition is a pure function of the store."""
    for name, value in (("discard_easiest", discard_easiest), ("calibrate_hardest", calibrate_hardest)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be a fraction in [0, 1), got {value}")
    num_crops = gt_prob.shape[1]
    num_easy, num_hard = round(discard_easiest * num_crops), round(calibrate_hardest * num_crops)
    if num_easy + num_hard >= num_crops:
        raise ValueError(f"discard_easiest={discard_easiest} and calibrate_hardest={calibrate_hardest} leave no "
                         f"teacher-labelled crop of {num_crops}")
    order = torch.sort(gt_prob, dim=1, descending=True, stable=True).indices  # most confident first
    kinds_in_order = torch.full((num_crops,), TEACHER, dtype=torch.int8)
    kinds_in_order[:num_easy] = DISCARD
    kinds_in_order[num_crops - num_hard :] = CALIBRATE
    return torch.empty_like(order, dtype=torch.int8).scatter_(1, order, kinds_in_order.expand_as(order).contiguous())


def crop_targets(labels: torch.Tensor, soft_index: torch.Tensor, soft_value: torch.Tensor, calibrated: torch.Tensor,
                 num_classes: int, smoothing: float, source: Literal["teacher", "hard"]) -> torch.Tensor:
    """Per-crop target distributions ``(B, C)`` in float32: the teacher's recovered top-k label, or for calibrated
    crops the smoothed ground truth ``(1 - eps) onehot + eps / C``; ``source="hard"``: one-hot ground truth for
    every crop (training without a teacher)."""
    one_hot = F.one_hot(labels, num_classes).float()
    if source == "hard":
        return one_hot
    softened = one_hot * (1.0 - smoothing) + smoothing / num_classes
    teacher = recover_soft_label(soft_index, soft_value, num_classes)
    return torch.where(calibrated[:, None], softened, teacher)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """FKD's ``Soft_CrossEntropy`` on ``logits / T``: ``mean_b -sum_c q_bc log softmax(z_b / T)_c``, in float32."""
    return -(targets * F.log_softmax(logits.float() / temperature, dim=-1)).sum(-1).mean()


def selfmix(images: torch.Tensor, targets: torch.Tensor, crops_per_image: int, lam: float,
            generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CutMix within each image: the batch is image-major (rows ``i*n .. i*n+n-1`` are image i's ``n`` crops); every
    crop receives a box from another crop of the same image (a per-image cyclic shift by 1..n-1), the box of area
    ``(1 - lam)`` of the crop at a uniform centre, clipped (FKD's ``rand_bbox``); targets mix by the exact kept area.
    Returns the mixed images, the mixed targets and the partner row of every row."""
    batch, _, height, width = images.shape
    if crops_per_image < 2 or batch % crops_per_image:
        raise ValueError(f"SelfMix needs >= 2 crops per image in an image-major batch, got {crops_per_image} "
                         f"crops per image and {batch} rows")
    num_images = batch // crops_per_image
    shift = torch.randint(1, crops_per_image, (num_images, 1), generator=generator)
    within = (torch.arange(crops_per_image).view(1, -1) + shift) % crops_per_image
    partner = (within + crops_per_image * torch.arange(num_images).view(-1, 1)).flatten().to(images.device)
    cut = float(np.sqrt(1.0 - lam))
    cut_h, cut_w = int(height * cut), int(width * cut)
    cy, cx = (int(torch.randint(n, (1,), generator=generator)) for n in (height, width))
    y1, y2 = np.clip(cy - cut_h // 2, 0, height), np.clip(cy + cut_h // 2, 0, height)
    x1, x2 = np.clip(cx - cut_w // 2, 0, width), np.clip(cx + cut_w // 2, 0, width)
    mixed = images.clone()
    mixed[:, :, y1:y2, x1:x2] = images[partner, :, y1:y2, x1:x2]
    kept = 1.0 - (y2 - y1) * (x2 - x1) / (height * width)
    return mixed, kept * targets + (1.0 - kept) * targets[partner], partner


class FerKD(ZooModule):
    """The student of FKD / FerKD on a :class:`~zoo.ferkd.data.SoftLabelDataModule` (which applies the crop
    partition, :func:`partition_crops`, with its ``discard_easiest`` / ``calibrate_hardest``).

    Args:
        target_source: ``teacher`` (stored soft labels, calibrated crops get the softened ground truth) or ``hard``
            (one-hot ground truth for every crop: the no-teacher baseline on the same crops and steps).
        calibration_smoothing: eps of the softened ground truth of calibrated crops.
        selfmix: mix crops of the same image (SelfMix); ``selfmix_alpha``: ``lam0 ~ Beta(alpha, alpha)``.
        temperature: the student's softmax temperature in the soft cross-entropy (official ``--temp 1.0``).
        Optimisation defaults (official FKD ResNet-50 command): SGD momentum 0.9 (no Nesterov), lr 0.1, weight decay
        1e-4 on every parameter, cosine to 0, no warm-up, no EMA.
    """

    def __init__(self, network: nn.Module, target_source: Literal["teacher", "hard"] = "teacher",
                 calibration_smoothing: float = 0.1, selfmix: bool = True, selfmix_alpha: float = 1.0,
                 temperature: float = 1.0, optimizer: str = "sgd", lr: float = 0.1, weight_decay: float = 1e-4,
                 nesterov: bool = False, cosine_cycles: float = 0.5, decay_norm_and_bias: bool = True,
                 ema_decay: float | None = None, **base):
        super().__init__(network, optimizer=optimizer, lr=lr, weight_decay=weight_decay, nesterov=nesterov,
                         cosine_cycles=cosine_cycles, decay_norm_and_bias=decay_norm_and_bias, ema_decay=ema_decay,
                         **base)
        if target_source not in ("teacher", "hard"):
            raise ValueError(f"target_source must be 'teacher' or 'hard', got {target_source!r}")
        if not 0.0 <= calibration_smoothing < 1.0:
            raise ValueError(f"calibration_smoothing must be in [0, 1), got {calibration_smoothing}")
        self.target_source, self.calibration_smoothing = target_source, calibration_smoothing
        self.selfmix, self.selfmix_alpha, self.temperature = selfmix, selfmix_alpha, temperature

    def setup(self, stage: str) -> None:
        self.num_classes = self.trainer.datamodule.num_classes
        if not hasattr(self, "val_acc"):
            self.val_acc = accuracy(self.num_classes)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        images, labels = batch["image"], batch["label"]
        targets = crop_targets(labels, batch["soft_index"], batch["soft_value"], batch["calibrated"],
                               self.num_classes, self.calibration_smoothing, self.target_source)
        if self.selfmix:
            lam = float(torch.distributions.Beta(self.selfmix_alpha, self.selfmix_alpha).sample())
            images, targets, _ = selfmix(images, targets, len(images) // len(batch["idx"]), lam)
        logits = self.network(images)
        loss = soft_cross_entropy(logits, targets, self.temperature)
        self.log_dict({"train/loss": loss, "train/calibrated_fraction": batch["calibrated"].float().mean(),
                       "train/acc": (logits.argmax(-1) == labels).float().mean()})
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> dict:
        logits = self.network(batch["image"])
        self.val_acc(logits, batch["label"])
        self.log("val/acc", self.val_acc, on_epoch=True, prog_bar=True)
        return {"preds": logits.argmax(1)}
