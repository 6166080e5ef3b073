"""Mean-teacher self-training for domain-adaptive semantic segmentation: DAFormer's host (DACS self-training),
which MIC, HIAST and FST build on, and the networks it trains.

Per step (``DAFormerSelfTraining.training_step``; lhoyer/MIC ``seg/mmseg/models/uda/dacs.py``):

1. source loss: pixel CE on the labelled source crops (+ the ImageNet feature distance on thing classes, when a
   pretrained encoder makes it meaningful);
2. the EMA teacher labels the *unmixed* target crops: argmax, and one quality weight per batch = the share of
   pixels whose confidence is >= 0.968 (both images pooled), broadcast to every pixel;
3. ClassMix (DACS): half of the classes of the source batch are pasted from each source crop onto a target crop
   (labels: source labels there, pseudo-labels elsewhere; weight 1 there, the quality weight elsewhere); the
   mixed crops get colour jitter and Gaussian blur;
4. mixed loss: the weighted pixel CE on the mixed crops. ``loss = source + mixed (+ a method's extra terms)``.

Details kept from the official code: the teacher is updated with alpha_t = min(1 - 1/(t+1), alpha) (0.5 at the
first update) and averages *parameters only*; it labels with Dropout/DropPath off and BatchNorm on *batch*
statistics (DAFormer runs its teacher in train mode); the teacher's running statistics are only used when the
teacher itself is evaluated (``val/ema_miou``), and are copied from the student (``ema_buffers: copy``). The
colour jitter/blur on-off draws are shared by the batch (jitter applied when a U(0,1) draw exceeds p = 0.2, i.e.
with probability 0.8), the jitter factors and blur sigma are drawn per image. ClassMix chooses among the classes
of the *whole source batch* (``torch.unique(labels)`` in ``get_class_masks``), the ignore label included. Pixel CE
is averaged over all pixels, ignored ones counting as 0 (mmseg's ``weight_reduce_loss``). The reported model is
the student (DAFormer evaluates ``get_model()``); ``val/ema_miou`` reports the teacher as well.
Differences: one summed backward replaces DAFormer's per-loss backward calls (same gradients); the official code's
``kornia.augmentation.ColorJitter`` (kornia 0.5) is today's ``ColorJiggle`` (kornia 0.6 renamed it and gave the
name ``ColorJitter`` to torchvision's formulas: multiplicative instead of additive brightness), so that is used.
"""
from __future__ import annotations

import contextlib
import copy
import random
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from kornia.augmentation import ColorJiggle
from kornia.filters import gaussian_blur2d

from zoo.core.media import wandb_loggers
from zoo.core.metrics import mean_iou
from zoo.core.module import ZooModule, param_groups

from .data import IGNORE, IMAGENET_MEAN, IMAGENET_STD

__all__ = ["ema_alpha", "pseudo_label_and_weight", "class_mix_masks", "one_mix", "strong_transform",
           "pixel_cross_entropy", "blur_kernel_size", "downscale_label_ratio", "feature_distance", "poly_warmup",
           "DAFormerSelfTraining", "teacher_mode"]


# ----------------------------------------------------------------------------------------- pure rules
def ema_alpha(step: int, alpha: float) -> float:
    """Teacher momentum at iteration ``step``: min(1 - 1/(step+1), alpha) (the mean-teacher warm ramp)."""
    return min(1 - 1 / (step + 1), alpha)


def pseudo_label_and_weight(logits: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Argmax pseudo-labels and DAFormer's quality weight: one scalar per batch, the share of pixels (all images
    pooled) with softmax confidence >= ``threshold``, broadcast to (B, H, W)."""
    confidence, labels = torch.softmax(logits.detach().float(), dim=1).max(dim=1)
    ratio = (confidence >= threshold).float().mean()
    return labels, ratio.expand_as(confidence).clone()


def class_mix_masks(labels: torch.Tensor) -> torch.Tensor:
    """DACS ClassMix masks (B, 1, H, W): for each source label map, the pixels of a random half (rounded up) of
    the classes found in the *whole batch* (as the official ``get_class_masks``; NumPy's global RNG)."""
    classes = torch.unique(labels)
    masks = []
    for label in labels:
        n = len(classes)
        chosen = classes[torch.from_numpy(np.random.choice(n, (n + n % 2) // 2, replace=False)).long()]
        masks.append(torch.isin(label, chosen).unsqueeze(0))
    return torch.stack(masks).to(labels.dtype if labels.is_floating_point() else torch.float32)


def one_mix(mask: torch.Tensor, foreground: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
    """``mask * foreground + (1 - mask) * background`` (mask broadcast over channels)."""
    return mask * foreground + (1 - mask) * background


def blur_kernel_size(side: int) -> int:
    """DAFormer's Gaussian blur kernel: the odd size nearest to 10 % of the image side."""
    return int(np.floor(np.ceil(0.1 * side) - 0.5 + np.ceil(0.1 * side) % 2))


def strong_transform(images: torch.Tensor, jitter_draw: float, blur_draw: float, strength: float = 0.2,
                     jitter_p: float = 0.2, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """DAFormer's colour jitter + Gaussian blur on normalised images, with kornia's ops as the official code
    (``dacs_transforms.color_jitter`` / ``gaussian_blur``; kornia 0.5's ColorJitter is today's ColorJiggle). The on/off draws are shared by the batch (jitter when
    ``jitter_draw > jitter_p``, blur when ``blur_draw > 0.5``); DAFormer transforms each mixed image on its own, so
    each gets its own jitter factors and order, and its own sigma ~ U(0.15, 1.15); the blur kernel is the odd size
    nearest to 10 % of each side. Jitter runs on the 0..1 scale (kornia clamps there)."""
    mean = torch.tensor(mean, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    std = torch.tensor(std, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    jitter = ColorJiggle(brightness=strength, contrast=strength, saturation=strength, hue=strength)
    out = []
    for image in images.unsqueeze(1):
        if jitter_draw > jitter_p:
            image = (jitter((image * std + mean) / 255.0) * 255.0 - mean) / std
        if blur_draw > 0.5:
            sigma = float(np.random.uniform(0.15, 1.15))
            kernel = tuple(blur_kernel_size(side) for side in image.shape[-2:])
            image = gaussian_blur2d(image, kernel, (sigma, sigma))
        out.append(image)
    return torch.cat(out)


def pixel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None = None):
    """Per-pixel CE (ignore 255 -> 0), times ``weight``, averaged over *all* pixels (mmseg's reduction)."""
    loss = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE, reduction="none")
    return (loss if weight is None else loss * weight).mean()


def downscale_label_ratio(labels: torch.Tensor, factor: int, min_ratio: float, num_classes: int) -> torch.Tensor:
    """Labels pooled by ``factor``: the majority class of each cell, or 255 if it covers < ``min_ratio``."""
    one_hot = F.one_hot(labels.masked_fill(labels == IGNORE, num_classes), num_classes + 1).permute(0, 3, 1, 2)
    ratio, pooled = F.avg_pool2d(one_hot.float(), factor).max(dim=1)
    return pooled.masked_fill((pooled == num_classes) | (ratio < min_ratio), IGNORE)


def feature_distance(features: torch.Tensor, imagenet_features: torch.Tensor, labels: torch.Tensor,
                     classes: Sequence[int], min_ratio: float, num_classes: int) -> torch.Tensor:
    """DAFormer's ImageNet feature distance: mean L2 distance between the student's and the frozen ImageNet
    encoder's bottleneck features, over cells whose pooled source label is one of ``classes`` (thing classes).
    An empty selection gives 0 (DAFormer gets a NaN without gradient there)."""
    pooled = downscale_label_ratio(labels, labels.shape[-1] // features.shape[-1], min_ratio, num_classes)
    selected = torch.isin(pooled, torch.tensor(list(classes), device=labels.device))
    distance = torch.linalg.vector_norm(features - imagenet_features.detach(), dim=1)
    return distance[selected].mean() if selected.any() else features.sum() * 0


def poly_warmup(step: int, total: int, warmup: int, warmup_ratio: float = 1e-6, power: float = 1.0) -> float:
    """mmcv's poly schedule (to 0 at ``total``) with linear warm-up from ``warmup_ratio``: the LR multiplier."""
    factor = (1 - step / total) ** power if step < total else 0.0
    if step < warmup:
        factor *= 1 - (1 - step / warmup) * (1 - warmup_ratio)
    return factor


@contextlib.contextmanager
def teacher_mode(network: nn.Module):
    """Dropout/DropPath off, BatchNorm on batch statistics without touching the running ones (as DAFormer's teacher
    in train mode); restores every module's mode afterwards."""
    modes = {m: m.training for m in network.modules()}
    norms = [m for m in network.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    network.eval()
    for m in norms:
        m.train()
        m.momentum = 0.0
    try:
        yield network
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        for m, mode in modes.items():
            m.training = mode


# ------------------------------------------------------------------------------------------- the module
class DAFormerSelfTraining(ZooModule):
    """DAFormer's self-training host (DACS with an EMA teacher); subclasses add their method's terms.

    Args:
        network: a segmentation network with ``features``/``decode`` (``SegFormerDAFormer`` or ``SmallDAFormer``).
        alpha: teacher EMA momentum ceiling (0.999; the ramp is :func:`ema_alpha`).
        pseudo_threshold: confidence for the quality weight (0.968).
        pseudo_weight_ignore_top, pseudo_weight_ignore_bottom: rows whose pseudo-label weight is zeroed (DAFormer's
            15 and 120 on Cityscapes crops: rectification artefacts at the image borders).
        color_jitter_strength, color_jitter_probability: DAFormer's 0.2 and 0.2; blur: Gaussian blur on/off.
        source_only: train on source crops only (the source-only baseline; no teacher).
        feature_distance_weight: ImageNet feature distance weight (0.005 with a pretrained encoder; 0 disables),
            on ``feature_distance_classes`` (Cityscapes thing classes) pooled with ``feature_distance_min_ratio``.
        lr, weight_decay, head_lr_mult, warmup_steps, warmup_ratio, poly_power: AdamW 6e-5, 0.01, head x10,
            linear warm-up 1500 iterations then poly(1.0) to 0 (no weight decay on normalisation layers).
        log_images_every_n_steps: cadence of the W&B pseudo-label panel.
    """

    expected_metrics = ("val/miou",)

    def __init__(self, network: nn.Module, alpha: float = 0.999, pseudo_threshold: float = 0.968,
                 pseudo_weight_ignore_top: int = 15, pseudo_weight_ignore_bottom: int = 120,
                 color_jitter_strength: float = 0.2, color_jitter_probability: float = 0.2, blur: bool = True,
                 source_only: bool = False, feature_distance_weight: float = 0.005,
                 feature_distance_classes: Sequence[int] = (6, 7, 11, 12, 13, 14, 15, 16, 17, 18),
                 feature_distance_min_ratio: float = 0.75, lr: float = 6e-5, weight_decay: float = 0.01,
                 head_lr_mult: float = 10.0, warmup_steps: int = 1500, warmup_ratio: float = 1e-6,
                 poly_power: float = 1.0, log_images_every_n_steps: int = 1000, compile: bool = False):
        super().__init__(network, optimizer="adamw", lr=lr, weight_decay=weight_decay, warmup_steps=warmup_steps,
                         ema_decay=None if source_only else alpha, ema_buffers="copy", compile=compile)
        self.alpha, self.pseudo_threshold = alpha, pseudo_threshold
        self.pseudo_weight_ignore_top = pseudo_weight_ignore_top
        self.pseudo_weight_ignore_bottom = pseudo_weight_ignore_bottom
        self.color_jitter_strength, self.color_jitter_probability, self.blur = (
            color_jitter_strength, color_jitter_probability, blur)
        self.source_only = source_only
        self.feature_distance_weight, self.feature_distance_classes = feature_distance_weight, feature_distance_classes
        self.feature_distance_min_ratio = feature_distance_min_ratio
        self.head_lr_mult, self.warmup_ratio, self.poly_power = head_lr_mult, warmup_ratio, poly_power
        self.log_images_every_n_steps = log_images_every_n_steps
        self.num_classes = network.head.classifier.out_channels
        # the frozen ImageNet encoder the feature distance pulls towards (a copy of the initial network)
        self.imagenet_network = (copy.deepcopy(network).requires_grad_(False).eval()
                                 if feature_distance_weight > 0 else None)

    # -------------------------------------------------------------------------------- teacher
    def ema_decay_at(self, step: int) -> float:
        """Called right after optimizer step ``step`` (0-based). DAFormer updates the teacher at the start of the
        next iteration, ``step + 1``, with min(1 - 1/(step + 2), alpha): 0.5 after the first step."""
        return ema_alpha(step + 1, self.alpha)

    def teacher_network(self) -> nn.Module:
        return self.ema.module

    @torch.no_grad()
    def teacher_logits(self, images: torch.Tensor) -> torch.Tensor:
        with teacher_mode(self.teacher_network()) as teacher:
            return teacher(images)

    def pseudo_labels(self, target_images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        labels, weight = pseudo_label_and_weight(self.teacher_logits(target_images), self.pseudo_threshold)
        weight[:, :self.pseudo_weight_ignore_top] = 0
        if self.pseudo_weight_ignore_bottom:
            weight[:, -self.pseudo_weight_ignore_bottom:] = 0
        return labels, weight

    # ------------------------------------------------------------------------------- the losses
    def source_loss(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        features = self.network.features(images)
        loss = pixel_cross_entropy(self.network.decode(features, images.shape[-2:]), labels)
        logs = {"train/source_loss": loss}
        if self.imagenet_network is not None:
            self.imagenet_network.eval()
            with torch.no_grad():
                imagenet_features = self.imagenet_network.features(images)[-1]
            distance = feature_distance(features[-1], imagenet_features, labels, self.feature_distance_classes,
                                        self.feature_distance_min_ratio, self.num_classes)
            logs["train/feature_distance"] = distance
            loss = loss + self.feature_distance_weight * distance
        return loss, logs

    def strong(self, images: torch.Tensor) -> torch.Tensor:
        """Colour jitter + blur with this call's on/off draws (DAFormer draws them once per forward)."""
        return strong_transform(images, random.uniform(0, 1), random.uniform(0, 1) if self.blur else 0.0,
                                self.color_jitter_strength, self.color_jitter_probability)

    def mixed_loss(self, source: dict, target_images: torch.Tensor, pseudo_labels: torch.Tensor,
                   pseudo_weight: torch.Tensor) -> tuple[torch.Tensor, dict]:
        mask = class_mix_masks(source["label"])
        images = self.strong(one_mix(mask, source["image"], target_images))
        labels = one_mix(mask[:, 0], source["label"], pseudo_labels).long()
        weight = one_mix(mask[:, 0], torch.ones_like(pseudo_weight), pseudo_weight)
        loss = pixel_cross_entropy(self.network(images), labels, weight)
        return loss, {"train/mixed_loss": loss}

    def extra_target_loss(self, target: dict, pseudo_labels: torch.Tensor, pseudo_weight: torch.Tensor):
        """A method's additional target term (MIC's masked consistency); the host has none."""
        return None, {}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        source, target = batch["source"], batch["target"]
        loss, logs = self.source_loss(source["image"], source["label"])
        if not self.source_only:
            pseudo_labels, pseudo_weight = self.pseudo_labels(target["image"])
            mixed, mixed_logs = self.mixed_loss(source, target["image"], pseudo_labels, pseudo_weight)
            extra, extra_logs = self.extra_target_loss(target, pseudo_labels, pseudo_weight)
            loss = loss + mixed + (0 if extra is None else extra)
            logs.update(mixed_logs, **extra_logs)
            valid = target["label"] != IGNORE  # diagnostics only: target labels never enter a loss
            logs["train/pseudo_weight"] = pseudo_weight.mean()
            logs["train/pseudo_label_acc"] = (pseudo_labels == target["label"])[valid].float().mean()
            if self.global_step % self.log_images_every_n_steps == 0:
                self.log_segmentation("train/pseudo_labels", target["image"],
                                      {"pseudo_label": pseudo_labels, "ground_truth": target["label"]})
        logs["train/loss"] = loss
        self.log_dict(logs)
        return loss

    # ---------------------------------------------------------------------------- evaluation
    def setup(self, stage: str) -> None:
        if not hasattr(self, "val_miou"):
            self.val_miou, self.val_class_iou = mean_iou(self.num_classes), mean_iou(self.num_classes, per_class=True)
            self.val_ema_miou = mean_iou(self.num_classes) if self.ema is not None else None

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        images, labels = batch["image"], batch["label"]
        logits = F.interpolate(self.network(images), size=labels.shape[-2:], mode="bilinear", align_corners=False)
        predictions = logits.argmax(1)
        self.val_miou.update(predictions, labels)
        self.val_class_iou.update(predictions, labels)
        self.log("val/miou", self.val_miou, on_epoch=True, prog_bar=True)
        if self.ema is not None:
            ema_logits = F.interpolate(self.ema(images), size=labels.shape[-2:], mode="bilinear", align_corners=False)
            self.val_ema_miou.update(ema_logits.argmax(1), labels)
            self.log("val/ema_miou", self.val_ema_miou, on_epoch=True)
        if batch_idx == 0:
            self.log_segmentation("val/predictions", F.interpolate(images, size=labels.shape[-2:]),
                                  {"prediction": predictions, "ground_truth": labels})

    def on_validation_epoch_end(self) -> None:
        classes = getattr(self.trainer.datamodule, "classes", None) or [str(c) for c in range(self.num_classes)]
        per_class = self.val_class_iou.compute()
        self.log_dict({f"val/iou/{name.replace(' ', '_')}": iou for name, iou in zip(classes, per_class)})
        self.val_class_iou.reset()

    def log_segmentation(self, key: str, images: torch.Tensor, masks: dict[str, torch.Tensor], limit: int = 4):
        """A W&B panel: each image with its label maps as switchable mask overlays (rank 0, W&B loggers only)."""
        loggers = wandb_loggers(self.trainer)
        if not loggers:
            return
        mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
        pictures = ((images[:limit].float() * std + mean).clamp(0, 255)).byte().permute(0, 2, 3, 1).cpu().numpy()
        classes = getattr(self.trainer.datamodule, "classes", None) or [str(c) for c in range(self.num_classes)]
        class_labels = {i: name for i, name in enumerate(classes)} | {IGNORE: "ignore"}
        overlays = [{name: {"mask_data": m[i].cpu().numpy().astype(np.uint8), "class_labels": class_labels}
                     for name, m in masks.items()} for i in range(len(pictures))]
        for lg in loggers:
            lg.log_image(key, list(pictures), step=self.global_step, masks=overlays)

    # ---------------------------------------------------------------------------- optimisation
    def configure_optimizers(self):
        """AdamW with the head at ``head_lr_mult`` x lr and no weight decay on normalisation layers (mmseg's
        ``paramwise_cfg``: custom keys ``head`` and ``norm``), poly schedule with linear warm-up. The no-decay rule is
        the zoo's one (every normalisation layer, bias and 1-d parameter): mmseg's substring key ``norm`` misses the
        head's BatchNorm layers, whose names are ``bn``, and the biases, a difference of weight decay 0.01 on a few
        thousand parameters."""
        groups = param_groups(self.network, self.weight_decay, lr=self.lr, lr_multipliers={"head.": self.head_lr_mult})
        opt = torch.optim.AdamW(groups, lr=self.lr, betas=(0.9, 0.999))
        total = int(self.trainer.estimated_stepping_batches)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: poly_warmup(step, total, self.warmup_steps, self.warmup_ratio, self.poly_power))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
