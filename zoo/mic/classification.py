"""MIC for image classification (Hoyer et al., CVPR 2023, Sec. 3.4): masked image consistency on top of SDAT
(CDAN + MCC trained with sharpness-aware minimisation), as in lhoyer/MIC ``cls/examples/cdan_mcc_sdat_masking.py``.

Per step, with an EMA teacher (alpha_t = min(1 - 1/(t+1), 0.9), parameters only, BatchNorm on batch statistics):

    q_t, y_hat = max / argmax softmax(teacher(x_T))                     (the full, unmasked target image)
    masked     = block_mask(colour_jitter_blur(x_T))                     (64 px patches at 224 px, ratio 0.7)
    L_MIC      = mean_i q_t,i * CE(student(masked_i), y_hat_i)           (per-sample quality weight)
    SAM perturbation from  CE_src + MCC_tgt + L_MIC  (no adversarial term: SDAT smooths the task loss only)
    update gradient at the perturbed weights of  CE_src + trade_off * (CDAN + MCC_tgt + L_MIC)

CDAN: the discriminator (Linear-BN-ReLU x2, Sigmoid; 1024 wide) sees softmax(g) (x) f through a gradient reversal
whose coefficient warms up as 2/(1 + exp(-i/1000)) - 1; BCE with source = 1. MCC: temperature-scaled class
confusion of the target batch, entropy-weighted, rows normalised, off-diagonal mass / C.

Where this follows the paper rather than the code: the official update pass uses the *unweighted* CE for the
masked term (the weight appears only in the SAM perturbation pass) and its ``Masking`` draws the colour-jitter /
blur on-off switches once for the whole run; here the masked term carries the per-sample weight in both passes and
the switches are drawn at every step, as in the paper and the segmentation code. SAM is written with
``torch.func.functional_call`` at the perturbed weights, so Lightning takes one ordinary optimizer step; the
discriminator shares the SGD optimizer (same settings as the official separate one) and is not perturbed.
"""
from __future__ import annotations

import math
import random
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call
from torchmetrics.classification import MulticlassAccuracy

from zoo.core.module import ZooModule
from zoo.core.datasets import MissingWeightsError
from zoo.segda.host import ema_alpha, strong_transform, teacher_mode
from zoo.mic.module import mask_images

__all__ = ["MICClassification", "BottleneckClassifier", "ViTBackbone", "DomainDiscriminator", "cdan_loss",
           "mcc_loss", "grl_coefficient", "prob_weighted_ce"]


class BottleneckClassifier(nn.Module):
    """Transfer-Learning-Library's ImageClassifier: backbone features -> Linear-BN-ReLU bottleneck -> Linear."""

    def __init__(self, backbone: nn.Module, num_classes: int, bottleneck_dim: int = 256):
        super().__init__()
        if hasattr(backbone, "classifier"):  # the bottleneck head replaces a core net's own (it would get no gradient)
            backbone.classifier = nn.Identity()
        self.backbone = backbone
        self.bottleneck = nn.Sequential(nn.Linear(backbone.num_features, bottleneck_dim),
                                        nn.BatchNorm1d(bottleneck_dim), nn.ReLU())
        self.classifier = nn.Linear(bottleneck_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.bottleneck(self.backbone.features(x))

    def forward(self, x: torch.Tensor, return_features: bool = False):
        f = self.features(x)
        return (self.classifier(f), f) if return_features else self.classifier(f)


VIT_VARIANTS = {"tiny": (192, 3), "small": (384, 6), "base": (768, 12)}  # width, heads; 12 layers, patch 16


class ViTBackbone(nn.Module):
    """ViT/16 (``transformers.ViTModel``): the final-norm class token, as timm's ``forward_features`` with
    ``--no-pool``. ``pretrained`` is the Hugging Face checkpoint (SDAT/MIC use timm's in21k+in1k ViT-B/16); an
    empty value builds ``variant`` with random weights (tests only)."""

    def __init__(self, pretrained: str | None = "google/vit-base-patch16-224",
                 variant: Literal["tiny", "small", "base"] = "base"):
        super().__init__()
        from transformers import ViTConfig, ViTModel

        if pretrained:
            try:
                self.vit = ViTModel.from_pretrained(pretrained, add_pooling_layer=False)
            except OSError as err:
                raise MissingWeightsError(
                    f"could not load {pretrained!r} ({err}); it downloads once into the Hugging Face cache with "
                    "internet, or set the backbone's pretrained to an empty value for random weights.") from err
        else:
            width, heads = VIT_VARIANTS[variant]
            self.vit = ViTModel(ViTConfig(hidden_size=width, num_attention_heads=heads, intermediate_size=4 * width),
                                add_pooling_layer=False)
        self.num_features = self.vit.config.hidden_size

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit(pixel_values=x, interpolate_pos_encoding=True).last_hidden_state[:, 0]


class DomainDiscriminator(nn.Sequential):
    def __init__(self, in_features: int, hidden: int = 1024):
        super().__init__(nn.Linear(in_features, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
                         nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, 1),
                         nn.Sigmoid())


class _ReverseGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, coefficient):
        ctx.coefficient = coefficient
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -ctx.coefficient * grad, None


def grl_coefficient(iteration: int, max_iters: int = 1000, alpha: float = 1.0) -> float:
    """Warm-start gradient reversal: 2 / (1 + exp(-alpha * i / N)) - 1, from 0 towards 1."""
    return 2.0 / (1.0 + math.exp(-alpha * iteration / max_iters)) - 1.0


def cdan_loss(discriminator: nn.Module, logits_s, features_s, logits_t, features_t, coefficient: float):
    """CDAN with the multilinear map softmax(g) (x) f (softmax detached), BCE with source = 1, target = 0."""
    g = torch.softmax(torch.cat([logits_s, logits_t]), dim=1).detach()
    f = torch.cat([features_s, features_t])
    h = torch.bmm(g.unsqueeze(2), f.unsqueeze(1)).flatten(1)
    d = discriminator(_ReverseGradient.apply(h, coefficient))
    domain = torch.cat([torch.ones(len(logits_s), 1), torch.zeros(len(logits_t), 1)]).to(d)
    return F.binary_cross_entropy(d.float(), domain)


def mcc_loss(logits: torch.Tensor, temperature: float = 2.0) -> torch.Tensor:
    """Minimum class confusion (Jin et al. 2020) of a target batch."""
    batch, num_classes = logits.shape
    p = torch.softmax(logits.float() / temperature, dim=1)
    entropy = -(p * torch.log(p + 1e-5)).sum(1).detach()
    weight = 1 + torch.exp(-entropy)
    weight = (batch * weight / weight.sum()).unsqueeze(1)
    confusion = (p * weight).t() @ p
    confusion = confusion / confusion.sum(dim=1)
    return (confusion.sum() - confusion.trace()) / num_classes


def prob_weighted_ce(logits: torch.Tensor, pseudo_labels: torch.Tensor, confidence: torch.Tensor) -> torch.Tensor:
    """MIC's classification consistency: CE to the teacher's labels weighted by its confidence, batch mean."""
    return (confidence * F.cross_entropy(logits.float(), pseudo_labels, reduction="none")).mean()


class MICClassification(ZooModule):
    """MIC(SDAT). Defaults are the official VisDA-2017 ViT-B/16 setting (``cls/experiments.py`` id 1).

    Args:
        network: a ``BottleneckClassifier``.
        mask_block_size, mask_ratio, mask_lambda: 64, 0.7, 1 (``mask_lambda: 0`` = the SDAT host alone).
        alpha: teacher EMA ceiling (0.9). color_jitter_strength / probability, blur: 0.2, 0.2, on.
        source_only: only the source CE (the source-only baseline; set ``rho: 0`` for plain SGD).
        rho: SAM radius (0.02). trade_off: weight of the transfer terms (1). temperature: MCC's (2.0).
        discriminator_hidden: CDAN discriminator width (1024); grl_max_iters: its warm-up length (1000).
        lr, momentum, weight_decay, lr_gamma, lr_decay: SGD-nesterov 0.002, 0.9, 1e-3 with
            lr * (1 + gamma t)^(-decay); ``backbone_lr_mult`` 0.1 for a pretrained backbone (1 from scratch).
        per_class_accuracy: report the mean of per-class accuracies (VisDA's protocol) as ``val/acc``.
    """

    def __init__(self, network: BottleneckClassifier, mask_block_size: int = 64, mask_ratio: float = 0.7,
                 mask_lambda: float = 1.0, alpha: float = 0.9, color_jitter_strength: float = 0.2,
                 color_jitter_probability: float = 0.2, blur: bool = True, source_only: bool = False,
                 rho: float = 0.02, trade_off: float = 1.0, temperature: float = 2.0,
                 discriminator_hidden: int = 1024, grl_max_iters: int = 1000, lr: float = 0.002,
                 weight_decay: float = 1e-3, lr_gamma: float = 0.001, lr_decay: float = 0.75,
                 backbone_lr_mult: float = 0.1, per_class_accuracy: bool = True, **base):
        uses_teacher = mask_lambda > 0 and not source_only
        super().__init__(network, optimizer="sgd", lr=lr, weight_decay=weight_decay, nesterov=True,
                         ema_decay=alpha if uses_teacher else None, ema_buffers="copy", **base)
        self.mask_block_size, self.mask_ratio, self.mask_lambda = mask_block_size, mask_ratio, mask_lambda
        self.alpha = alpha
        self.color_jitter_strength, self.color_jitter_probability, self.blur = (
            color_jitter_strength, color_jitter_probability, blur)
        self.source_only, self.rho, self.trade_off, self.temperature = source_only, rho, trade_off, temperature
        self.grl_max_iters, self.lr_gamma, self.lr_decay = grl_max_iters, lr_gamma, lr_decay
        self.backbone_lr_mult, self.per_class_accuracy = backbone_lr_mult, per_class_accuracy
        num_classes = network.classifier.out_features
        self.discriminator = (None if source_only else
                              DomainDiscriminator(network.classifier.in_features * num_classes, discriminator_hidden))

    def ema_decay_at(self, step: int) -> float:
        return ema_alpha(step + 1, self.alpha)  # the teacher update that opens iteration step + 1

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.per_class_accuracy:  # VisDA reports the mean of the per-class accuracies
            num_classes = self.network.classifier.out_features
            self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="macro")
            self.val_ema_acc = MulticlassAccuracy(num_classes=num_classes, average="macro") if self.ema else None

    def losses(self, parameters: dict, batch: dict, masked, pseudo_labels, confidence, update_pass: bool):
        """The task terms (perturbation pass) or the full SDAT + MIC objective (update pass) at ``parameters``."""
        source, target = batch["source"], batch["target"]
        run = lambda x: functional_call(self.network, parameters, (x,), {"return_features": True})  # noqa: E731
        logits, features = run(torch.cat([source["image"], target["image"]]))
        logits_s, logits_t = logits.split([len(source["image"]), len(target["image"])])
        logs = {"train/source_loss": F.cross_entropy(logits_s.float(), source["label"])}
        if self.source_only:
            return logs["train/source_loss"], logs
        transfer = logs["train/mcc_loss"] = mcc_loss(logits_t, self.temperature)
        if masked is not None:
            logs["train/masked_loss"] = self.mask_lambda * prob_weighted_ce(run(masked)[0], pseudo_labels, confidence)
            transfer = transfer + logs["train/masked_loss"]
        if not update_pass:
            return logs["train/source_loss"] + transfer, logs
        features_s, features_t = features.split([len(logits_s), len(logits_t)])
        coefficient = grl_coefficient(self.global_step, self.grl_max_iters)
        logs["train/cdan_loss"] = cdan_loss(self.discriminator, logits_s, features_s, logits_t, features_t,
                                            coefficient)
        return logs["train/source_loss"] + self.trade_off * (transfer + logs["train/cdan_loss"]), logs

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        target = batch["target"]["image"]
        masked = pseudo_labels = confidence = None
        if self.ema is not None:
            with torch.no_grad(), teacher_mode(self.ema.module) as teacher:
                confidence, pseudo_labels = torch.softmax(teacher(target).float(), dim=1).max(dim=1)
            augmented = strong_transform(target, random.uniform(0, 1), random.uniform(0, 1) if self.blur else 0.0,
                                         self.color_jitter_strength, self.color_jitter_probability)
            masked = mask_images(augmented, self.mask_block_size, self.mask_ratio)
        parameters = dict(self.network.named_parameters())
        if self.rho > 0:  # SAM: climb to w + rho * g / ||g|| along the task-loss gradient, take the gradient there
            task_loss, _ = self.losses(parameters, batch, masked, pseudo_labels, confidence, update_pass=False)
            grads = torch.autograd.grad(task_loss, list(parameters.values()), allow_unused=True)
            norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads if g is not None]))
            parameters = {name: p if g is None else p + (self.rho / (norm + 1e-12)) * g.detach()
                          for (name, p), g in zip(parameters.items(), grads)}
        loss, logs = self.losses(parameters, batch, masked, pseudo_labels, confidence, update_pass=True)
        if pseudo_labels is not None:  # diagnostics only: target labels never enter a loss
            logs["train/pseudo_label_acc"] = (pseudo_labels == batch["target"]["label"]).float().mean()
            logs["train/pseudo_weight"] = confidence.mean()
        self.log_dict({"train/loss": loss, **logs})
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> dict:
        return self.classifier_validation_step(batch)

    def configure_optimizers(self):
        """SGD-nesterov on backbone (x ``backbone_lr_mult``), bottleneck + classifier and discriminator, weight
        decay on every parameter (as the official SGD), lr * (1 + gamma t)^(-decay)."""
        head = [p for n, p in self.network.named_parameters() if not n.startswith("backbone.")]
        groups = [{"params": list(self.network.backbone.parameters()), "lr": self.lr * self.backbone_lr_mult},
                  {"params": head, "lr": self.lr}]
        if self.discriminator is not None:
            groups.append({"params": list(self.discriminator.parameters()), "lr": self.lr})
        opt = torch.optim.SGD(groups, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay,
                              nesterov=True)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda t: (1 + self.lr_gamma * t) ** (-self.lr_decay))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
