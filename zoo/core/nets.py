"""Backbones shared by several papers. Each exposes ``features(x)`` (pooled vector) and ``classifier``."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["CifarBasicBlock", "CifarResNet", "WideResNet", "SmallCNN"]


class _Block(nn.Module):
    """Pre-activation basic block. When the width changes, the activated input feeds both the convolution
    and the 1x1 shortcut; otherwise the shortcut is the raw input (as in FixMatch's and USB's WRN)."""

    def __init__(self, c_in: int, c_out: int, stride: int, bn_momentum: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in, momentum=bn_momentum, eps=0.001)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out, momentum=bn_momentum, eps=0.001)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.shortcut = None if c_in == c_out else nn.Conv2d(c_in, c_out, 1, stride, 0, bias=False)

    def forward(self, x):
        pre = F.leaky_relu(self.bn1(x), 0.1)
        out = self.conv2(F.leaky_relu(self.bn2(self.conv1(pre)), 0.1))
        return out + (x if self.shortcut is None else self.shortcut(pre))


class WideResNet(nn.Module):
    """WRN-depth-widen as used by FixMatch and USB (``wrn_28_2``: 1,467,626 parameters for 10 classes).

    LeakyReLU(0.1), BatchNorm momentum 0.001 / eps 0.001, pre-activation blocks, no dropout.
    """

    def __init__(self, num_classes: int = 10, depth: int = 28, widen: int = 2, bn_momentum: float = 0.001,
                 in_channels: int = 3):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError("WideResNet depth must be 6n+4")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1)
        blocks = []
        for g, stride in enumerate((1, 2, 2)):
            for i in range(n):
                blocks.append(_Block(widths[g] if i == 0 else widths[g + 1], widths[g + 1], stride if i == 0 else 1,
                                     bn_momentum))
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(widths[3], momentum=bn_momentum, eps=0.001)
        self.num_features = widths[3]
        self.classifier = nn.Linear(widths[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight)
                nn.init.zeros_(m.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.conv1(x))
        return F.adaptive_avg_pool2d(F.leaky_relu(self.bn(x), 0.1), 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class SmallCNN(nn.Module):
    """A fast conv net for CPU-sized runs: three conv-BN-LeakyReLU pairs with max-pooling, global pooling."""

    def __init__(self, num_classes: int = 10, width: int = 32, bn_momentum: float = 0.1, in_channels: int = 3):
        super().__init__()

        def pair(c_in, c_out):
            return [nn.Conv2d(c_in, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out, momentum=bn_momentum),
                    nn.LeakyReLU(0.1), nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False),
                    nn.BatchNorm2d(c_out, momentum=bn_momentum), nn.LeakyReLU(0.1)]

        w = width
        self.body = nn.Sequential(*pair(in_channels, w), nn.MaxPool2d(2), *pair(w, 2 * w), nn.MaxPool2d(2),
                                  *pair(2 * w, 4 * w))
        self.num_features = 4 * w
        self.classifier = nn.Linear(4 * w, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(self.body(x), 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class CifarBasicBlock(nn.Module):
    """Post-activation basic block; when the block halves the resolution, the shortcut is option A of He et al.
    (2016): subsample by 2 and pad the new channels with zeros, so the shortcut has no parameters."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.stride, self.extra_channels = stride, c_out - c_in

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra_channels)) if self.extra_channels else x

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.shortcut(x) + self.bn2(self.conv2(out)))


class CifarResNet(nn.Module):
    """The CIFAR ResNet of He et al. (2016), depth 6n+2 (20, 32, 44, 56, 110): a 3x3 stem of 16 channels, three
    stages of n basic blocks at 16/32/64 channels with option-A shortcuts, global average pooling. ``resnet32``
    (depth 32: 464,154 parameters for 10 classes) is the network of SLA's and MDCS's CIFAR tables."""

    def __init__(self, num_classes: int = 10, depth: int = 32, in_channels: int = 3, width: int = 16):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CifarResNet depth must be 6n+2 (20, 32, 44, 56, 110), not {depth}")
        n = (depth - 2) // 6
        widths = [width, 2 * width, 4 * width]
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        blocks, c_in = [], width
        for stage, c_out in enumerate(widths):
            for i in range(n):
                blocks.append(CifarBasicBlock(c_in, c_out, 2 if stage > 0 and i == 0 else 1))
                c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.num_features = widths[-1]
        self.classifier = nn.Linear(widths[-1], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight)
                nn.init.zeros_(m.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(F.relu(self.bn1(self.conv1(x))))
        return F.adaptive_avg_pool2d(x, 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
