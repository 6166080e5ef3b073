"""ITTA's networks: a ResNet cut at its four residual stages, MixStyle, and the element-wise affine stacks that
serve both as the learnable consistency loss g_phi and as the test-time adaptive parameters.

Official code (``liangchen527/ITTA``, ``domainbed/networks.py``): ``ResNet_ITTA`` (torchvision ResNet-18 with
frozen BatchNorm, MixStyle after ``layer1`` or ``layer2``), ``Adaparams`` (g_phi: 10 affine layers on 512-d
features) and ``MappingNetwork`` (5 affine layers per stage on the 64x56x56 ... 512x7x7 feature maps). Their
shapes are ResNet-18-at-224-px constants there; here they come from the network's feature widths and the image
size (:meth:`StagedResNet.stage_shapes`).
"""
from __future__ import annotations

import random
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from zoo.ssl.encoders import timm_encoder

__all__ = ["AffineReLUStack", "StagedResNet", "mixstyle"]


def mixstyle(x: torch.Tensor, alpha: float = 0.1, eps: float = 1e-6) -> torch.Tensor:
    """MixStyle (Zhou et al., 2021) as in ``ResNet_ITTA.mixstyle``: each sample's channel mean and std (over H, W,
    unbiased variance, detached) are mixed with those of a randomly permuted sample of the batch,
    ``lambda ~ Beta(alpha, alpha)`` per sample. The draws (Beta, then the permutation) follow the official order."""
    mu = x.mean(dim=(2, 3), keepdim=True).detach()
    sigma = (x.var(dim=(2, 3), keepdim=True) + eps).sqrt().detach()
    lam = torch.distributions.Beta(alpha, alpha).sample((x.size(0), 1, 1, 1)).to(x)
    perm = torch.randperm(x.size(0))
    mixed_mu = mu * lam + mu[perm] * (1 - lam)
    mixed_sigma = sigma * lam + sigma[perm] * (1 - lam)
    return (x - mu) / sigma * mixed_sigma + mixed_mu


class AffineReLUStack(nn.Module):
    """``depth`` element-wise affine maps ``w * x + b`` (``w``, ``b`` of ``shape``, initialised to the identity) with
    a ReLU between consecutive ones: ``Adaparams`` (g_phi, shape ``(features,)``) and one stage of
    ``MappingNetwork`` (shape ``(C, H, W)``). With non-negative inputs (post-ReLU feature maps) the fresh stack is
    the identity."""

    def __init__(self, shape: tuple[int, ...], depth: int):
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.weight = nn.ParameterList([nn.Parameter(torch.ones(shape)) for _ in range(depth)])
        self.bias = nn.ParameterList([nn.Parameter(torch.zeros(shape)) for _ in range(depth)])

    @torch.no_grad()
    def reset_to_identity(self) -> None:
        for w, b in zip(self.weight, self.bias):
            w.fill_(1.0)
            b.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for w, b in zip(self.weight[:-1], self.bias[:-1]):
            x = F.relu(w * x + b)
        return self.weight[-1] * x + self.bias[-1]


class StagedResNet(nn.Module):
    """A timm ResNet as stem, four residual stages and average pooling, plus a linear ``classifier``.

    Args:
        num_classes: classifier outputs (PACS: 7).
        name: timm model name; ``resnet18.tv_in1k`` holds torchvision's ImageNet weights, DomainBed's ResNet-18.
        pretrained: load the named weights (offline: a clear error; ``false`` trains from random init).
        model_kwargs: passed to ``timm.create_model`` (``{"channels": [16, 32, 64, 128]}``: a small ResNet-18).
        freeze_bn: keep every BatchNorm in eval mode (running statistics) while training, as DomainBed's ResNet
            does with ImageNet weights; a randomly initialised network needs ``false``.
    """

    def __init__(self, num_classes: int = 7, name: str = "resnet18.tv_in1k", pretrained: bool = True,
                 model_kwargs: dict[str, Any] | None = None, weights_file: str | None = None, freeze_bn: bool = True):
        super().__init__()
        encoder = timm_encoder(name, pretrained=pretrained, weights_file=weights_file, model_kwargs=model_kwargs)
        if not all(hasattr(encoder, f"layer{i}") for i in range(1, 5)):
            raise ValueError(f"StagedResNet needs a timm ResNet (layer1..layer4); {name!r} is not one")
        self.stem = nn.Sequential(encoder.conv1, encoder.bn1, encoder.act1, encoder.maxpool)
        self.stages = nn.ModuleList([encoder.layer1, encoder.layer2, encoder.layer3, encoder.layer4])
        self.num_features = encoder.num_features
        self.classifier = nn.Linear(self.num_features, num_classes)
        self.freeze_bn = freeze_bn

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_bn:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    @staticmethod
    def pool(h: torch.Tensor) -> torch.Tensor:
        return h.mean(dim=(2, 3))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for stage in self.stages:
            h = stage(h)
        return self.pool(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    @torch.no_grad()
    def stage_shapes(self, image_size: int) -> list[tuple[int, int, int]]:
        """(C, H, W) after each stage for ``image_size`` inputs (ResNet-18 at 224 px: 64x56x56 ... 512x7x7)."""
        was_training = self.training
        self.eval()  # no running-statistics update
        h, shapes = self.stem(torch.zeros(1, 3, image_size, image_size)), []
        for stage in self.stages:
            h = stage(h)
            shapes.append(tuple(h.shape[1:]))
        self.train(was_training)
        return shapes

    def two_paths(self, x: torch.Tensor, mixstyle_alpha: float = 0.1,
                  adapters: nn.ModuleList | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled features of the original path z and of the MixStyle path z' (``ResNet_ITTA.forward`` /
        ``fea2`` / ``fea_forward``): the two paths share the stem and ``layer1``; MixStyle perturbs the
        augmented path after ``layer1`` or, with probability 0.5 (Python's ``random``, as the official code),
        after ``layer2``. ``adapters`` (one module per stage) follow each stage on both paths (``test_adapt``)."""
        h = self.stages[0](self.stem(x))
        mix_after = 0 if random.random() > 0.5 else 1
        h_aug = mixstyle(h, mixstyle_alpha) if mix_after == 0 else h
        if adapters is not None:
            h, h_aug = adapters[0](h), adapters[0](h_aug)
        for i in range(1, len(self.stages)):
            h, h_aug = self.stages[i](h), self.stages[i](h_aug)
            if i == mix_after:
                h_aug = mixstyle(h_aug, mixstyle_alpha)
            if adapters is not None:
                h, h_aug = adapters[i](h), adapters[i](h_aug)
        return self.pool(h), self.pool(h_aug)

    def adapted_logits(self, x: torch.Tensor, adapters: nn.ModuleList) -> torch.Tensor:
        """Predictions with ``adapters[i]`` after stage ``i`` (``ITTA.predict``)."""
        h = self.stem(x)
        for stage, adapter in zip(self.stages, adapters):
            h = adapter(stage(h))
        return self.classifier(self.pool(h))
