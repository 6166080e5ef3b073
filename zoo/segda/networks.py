"""The segmentation networks DAFormer's self-training trains: DAFormer's context-aware fusion head on the SegFormer
Mix Transformer encoder (the paper's network) and a small random-init conv encoder for CPU runs."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Literal, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from zoo.core.datasets import MissingWeightsError

__all__ = ["DAFormerHead", "SmallDAFormer", "SegFormerDAFormer", "MIT_VARIANTS"]

def _conv_bn_relu(c_in: int, c_out: int, kernel: int = 1, dilation: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, padding=dilation * (kernel // 2), dilation=dilation,
                                   groups=groups, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class DAFormerHead(nn.Module):
    """DAFormer's context-aware fusion decoder (``daformer_sepaspp``): a linear embedding of each encoder level to
    ``embed_dim``, bilinear upsampling to the 1/4 level, and a depthwise-separable ASPP (dilations 1, 6, 12, 18,
    no image pooling) + 3x3 bottleneck fusion, then Dropout2d(0.1) and a 1x1 classifier."""

    def __init__(self, in_channels: Sequence[int], num_classes: int, embed_dim: int = 256,
                 dilations: Sequence[int] = (1, 6, 12, 18), dropout: float = 0.1):
        super().__init__()
        self.embed = nn.ModuleList(nn.Linear(c, embed_dim) for c in in_channels)
        fused = embed_dim * len(in_channels)
        self.aspp = nn.ModuleList(
            _conv_bn_relu(fused, embed_dim) if d == 1 else
            nn.Sequential(_conv_bn_relu(fused, fused, 3, d, groups=fused), _conv_bn_relu(fused, embed_dim))
            for d in dilations)
        self.bottleneck = _conv_bn_relu(embed_dim * len(dilations), embed_dim, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(embed_dim, num_classes, 1)
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        size = features[0].shape[-2:]
        embedded = []
        for embed, f in zip(self.embed, features):
            e = embed(f.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(f.shape[0], -1, *f.shape[-2:])
            embedded.append(F.interpolate(e, size=size, mode="bilinear", align_corners=False))
        x = torch.cat(embedded, dim=1)
        x = self.bottleneck(torch.cat([branch(x) for branch in self.aspp], dim=1))
        return self.classifier(self.dropout(x))


class _SegmentationNetwork(nn.Module, ABC):
    """Encoder (4 levels at strides 4-32) + DAFormer head; ``forward`` returns logits at the input resolution."""

    encoder: nn.Module
    head: DAFormerHead

    @abstractmethod
    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The encoder's 4 feature maps, finest first."""

    def decode(self, features: Sequence[torch.Tensor], size) -> torch.Tensor:
        return F.interpolate(self.head(features), size=size, mode="bilinear", align_corners=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.features(x), x.shape[-2:])


class SmallDAFormer(_SegmentationNetwork):
    """A small random-init network for CPU runs: a 4-level conv encoder (strides 4, 8, 16, 32) and the DAFormer
    head with a narrower embedding and dilations scaled to small crops."""

    def __init__(self, num_classes: int, widths: Sequence[int] = (16, 32, 64, 128), embed_dim: int = 64,
                 dilations: Sequence[int] = (1, 2, 3, 4)):
        super().__init__()
        stem = nn.Sequential(_conv_bn_relu(3, widths[0], 3), nn.MaxPool2d(2), _conv_bn_relu(widths[0], widths[0], 3),
                             nn.MaxPool2d(2))
        stages = [nn.Sequential(nn.MaxPool2d(2), _conv_bn_relu(c_in, c_out, 3), _conv_bn_relu(c_out, c_out, 3))
                  for c_in, c_out in zip(widths[:-1], widths[1:])]
        self.encoder = nn.ModuleList([stem, *stages])
        self.head = DAFormerHead(widths, num_classes, embed_dim, dilations)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for stage in self.encoder:
            x = stage(x)
            out.append(x)
        return out


MIT_VARIANTS = {"b0": ([2, 2, 2, 2], [32, 64, 160, 256]), "b1": ([2, 2, 2, 2], [64, 128, 320, 512]),
                "b2": ([3, 4, 6, 3], [64, 128, 320, 512]), "b3": ([3, 4, 18, 3], [64, 128, 320, 512]),
                "b4": ([3, 8, 27, 3], [64, 128, 320, 512]), "b5": ([3, 6, 40, 3], [64, 128, 320, 512])}


class SegFormerDAFormer(_SegmentationNetwork):
    """DAFormer: the SegFormer Mix Transformer encoder (``transformers.SegformerModel``; DAFormer uses MiT-B5 with
    ImageNet-1k weights, drop path 0.1) and the DAFormer head.

    ``pretrained`` names the Hugging Face checkpoint (``nvidia/mit-b5``: the ImageNet-1k MiT-B5 encoder), loaded
    from the local cache or downloaded; ``None`` builds the ``variant`` with random weights (tests only).
    """

    def __init__(self, num_classes: int, variant: Literal["b0", "b1", "b2", "b3", "b4", "b5"] = "b5",
                 pretrained: str | None = "nvidia/mit-b5", embed_dim: int = 256,
                 dilations: Sequence[int] = (1, 6, 12, 18), drop_path_rate: float = 0.1):
        super().__init__()
        from transformers import SegformerConfig, SegformerModel

        if pretrained:
            try:
                self.encoder = SegformerModel.from_pretrained(pretrained, drop_path_rate=drop_path_rate)
            except OSError as err:
                raise MissingWeightsError(
                    f"could not load the pretrained encoder {pretrained!r} ({err}).\n  With internet it downloads "
                    f"once into the Hugging Face cache; offline, copy that cache entry (HF_HOME) to this machine, or "
                    f"set model.init_args.network.init_args.pretrained=null to train from random weights.") from err
        else:
            depths, hidden = MIT_VARIANTS[variant]
            self.encoder = SegformerModel(SegformerConfig(depths=depths, hidden_sizes=hidden,
                                                          drop_path_rate=drop_path_rate))
        self.head = DAFormerHead(self.encoder.config.hidden_sizes, num_classes, embed_dim, dilations)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.encoder(pixel_values=x, output_hidden_states=True).hidden_states)


