"""Encoders and heads of joint-embedding methods.

- :func:`timm_encoder`: any timm backbone as a feature extractor (``num_classes=0``: pooled features, exposing
  ``num_features``), random init offline, the paper's pretrained names in paper settings; ``cifar_stem`` swaps a
  ResNet's 7x7/2 convolution + max-pool for a 3x3/1 convolution and no pool, the standard modification for 32x32
  inputs (SimCLR Appendix B.9; the official code does it for ``image_size <= 32``).
- :class:`MLPHead`: projector and predictor MLPs. SimCLR's projector (2 layers, BN after both, the last without
  bias or shift: the official ``projection_head``) and BYOL's projector/predictor (Linear-BN-ReLU-Linear,
  4096 -> 256) are both instances.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

__all__ = ["timm_encoder", "feature_dim", "MLPHead", "BatchNormNoShift"]


def timm_encoder(name: str = "resnet18", pretrained: bool = False, cifar_stem: bool = False,
                 weights_file: str | None = None, model_kwargs: dict[str, Any] | None = None) -> nn.Module:
    """A timm backbone returning pooled features (``timm.create_model(name, num_classes=0, ...)``).

    Args:
        name: a timm model name (``resnet18``, ``resnet50``, ``vit_small_patch16_224``, or a tagged pretrained name
            such as ``resnet50.a1_in1k``).
        pretrained: load timm's pretrained weights for ``name`` (from the Hugging Face hub cache; nothing downloads
            offline: a clear error names the weights and where they are expected).
        cifar_stem: for 32x32 inputs, replace a ResNet's first 7x7 stride-2 convolution with a 3x3 stride-1 one (same
            width) and drop the stem max-pool (random init, so not with pretrained weights).
        weights_file: a local weights file for ``name`` (timm's ``pretrained_cfg_overlay=dict(file=...)``), the
            offline alternative to the hub.
        model_kwargs: passed to ``timm.create_model`` (e.g. ``{"channels": [32, 64, 128, 256]}`` for a half-width
            ResNet, ``{"drop_path_rate": 0.1}`` for a ViT).
    """
    import timm

    kwargs = dict(model_kwargs or {})
    if "channels" in kwargs:  # YAML gives a list; timm's ResNet takes a tuple
        kwargs["channels"] = tuple(kwargs["channels"])
    if weights_file is not None:
        if not Path(weights_file).is_file():
            raise FileNotFoundError(f"weights_file for timm model {name!r} not found: {Path(weights_file).resolve()}")
        pretrained = True
        kwargs["pretrained_cfg_overlay"] = dict(file=weights_file)
    if cifar_stem and pretrained:
        raise ValueError("cifar_stem replaces the first convolution: it cannot be combined with pretrained weights")
    try:
        model = timm.create_model(name, num_classes=0, pretrained=pretrained, **kwargs)
    except Exception as err:  # offline: huggingface_hub's LocalEntryNotFoundError / OfflineModeIsEnabled, ...
        if not pretrained:
            raise
        source = weights_file or _hub_weights_name(name)
        raise RuntimeError(
            f"could not load the pretrained weights of timm model {name!r} ({source}): {type(err).__name__}: {err}\n"
            f"  With internet they download once into the Hugging Face cache (HF_HOME, default ~/.cache/huggingface);"
            f" offline, put them there or pass weights_file=<path to the .safetensors/.pth file>; or train from "
            f"random init with pretrained=false.") from err
    if cifar_stem:
        _use_cifar_stem(model, name)
    return model


def _hub_weights_name(name: str) -> str:
    """The weights timm would fetch for ``name`` (e.g. ``timm/resnet18.a1_in1k``), for error messages."""
    try:
        import timm

        cfg = timm.models.get_pretrained_cfg(name)
        return f"hub id {cfg.hf_hub_id}" if cfg is not None and cfg.hf_hub_id else f"weights for {name}"
    except Exception:  # an unknown name: timm's own error already says so
        return f"weights for {name}"


def _use_cifar_stem(model: nn.Module, name: str) -> None:
    conv, pool = getattr(model, "conv1", None), getattr(model, "maxpool", None)
    if not isinstance(conv, nn.Conv2d) or pool is None:
        raise ValueError(f"cifar_stem applies to timm ResNets (a conv1 + maxpool stem); {name!r} has none")
    model.conv1 = nn.Conv2d(conv.in_channels, conv.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()


def feature_dim(network: nn.Module) -> int:
    """The width of ``network``'s pooled features: its ``num_features`` (every timm model has it)."""
    dim = getattr(network, "num_features", None)
    if not isinstance(dim, int):
        raise ValueError(f"{type(network).__name__} has no integer `num_features`: an SSL encoder must say the width "
                         "of the features it returns (timm models do; set the attribute on your own modules)")
    return dim


class BatchNormNoShift(nn.Module):
    """Batch normalisation with a learned scale and no shift (TF's ``batch_normalization(center=False)``), the last
    layer of SimCLR's projector: its output is L2-normalised, and the official code gives it no offset."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False)
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x) * self.weight


class MLPHead(nn.Module):
    """``num_layers`` linear layers; every layer but the last is Linear -> BN -> ReLU.

    Args:
        in_dim, hidden_dim, out_dim: widths.
        num_layers: 2 for SimCLR's projector and for BYOL's projector and predictor.
        batch_norm: BN after the hidden layers (their Linear then has no bias: BN removes it anyway, and its
            gradient would be exactly zero).
        output_batch_norm: BN without shift after the last layer (SimCLR's official projector); otherwise the last
            layer is a plain Linear with bias (BYOL).
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 2, batch_norm: bool = True,
                 output_batch_norm: bool = False):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(num_layers - 1):
            layers.append(nn.Linear(dim, hidden_dim, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.ReLU(inplace=True))
            dim = hidden_dim
        layers.append(nn.Linear(dim, out_dim, bias=not output_batch_norm))
        if output_batch_norm:
            layers.append(BatchNormNoShift(out_dim))
        self.layers = nn.Sequential(*layers)
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)
