"""WSCL's network: one fully convolutional network per view of the image (RGB, SRM noise residual, Bayar
constrained convolution), each an encoder + C1 decoder with a pair of projection heads for the inter-patch
consistency volume (official ``models/main_model.py`` ``MainModel``, ``models/models.py`` ``C1``,
``models/srm_conv.py``, ``models/bayar_conv.py``; repository ``yhZhai/WSCL``).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from zoo.core.datasets import MissingWeightsError

__all__ = ["BayarConv2d", "FCN", "MultiViewFCN", "SRMFilter", "VIEWS"]

VIEWS = ("rgb", "srm", "bayar")

# The three SRM high-pass kernels of Zhou et al. (CVPR 2018), each divided by its quantisation step q = 4, 12, 2
_SRM_KERNELS = (
    ([[0, 0, 0, 0, 0], [0, -1, 2, -1, 0], [0, 2, -4, 2, 0], [0, -1, 2, -1, 0], [0, 0, 0, 0, 0]], 4.0),
    ([[-1, 2, -2, 2, -1], [2, -6, 8, -6, 2], [-2, 8, -12, 8, -2], [2, -6, 8, -6, 2], [-1, 2, -2, 2, -1]], 12.0),
    ([[0, 0, 0, 0, 0], [0, 0, 0, 0, 0], [0, 1, -2, 1, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0]], 2.0),
)


class SRMFilter(nn.Module):
    """Fixed SRM noise residuals: output channel c is kernel c applied to the sum of the three input channels,
    clipped to [-clip, clip] (``clip=0``: no clipping). Official ``SRMConv2d`` (zero padding 2, no bias)."""

    def __init__(self, clip: float = 5.0):
        super().__init__()
        kernels = torch.stack([torch.tensor(k, dtype=torch.float32) / q for k, q in _SRM_KERNELS])
        self.register_buffer("weight", kernels[:, None].expand(3, 3, 5, 5).contiguous(), persistent=False)
        self.clip = clip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(x, self.weight.to(x.dtype), padding=2)
        return x.clamp(-self.clip, self.clip) if self.clip else x


class BayarConv2d(nn.Module):
    """Bayar & Stamm's constrained convolution: the centre tap is fixed at ``-magnitude`` and the other taps are
    projected onto ``sum = magnitude`` before every forward pass (so each kernel sums to zero: a learned
    prediction-error filter). As in the official ``BayarConv2d``, the projection overwrites the stored weights
    (projected gradient descent: the gradient reaches the projected taps, the division is not differentiated).
    The weight is laid out (out, in, taps) and initialised uniform in [0, 1)."""

    def __init__(self, channels: int = 3, kernel_size: int = 5, magnitude: float = 1.0):
        super().__init__()
        self.kernel_size, self.magnitude = kernel_size, magnitude
        self.weight = nn.Parameter(torch.rand(channels, channels, kernel_size**2 - 1))

    def kernel(self) -> torch.Tensor:
        with torch.no_grad():
            self.weight.copy_(self.weight / self.weight.sum(-1, keepdim=True) * self.magnitude)
        centre = self.weight.new_full((*self.weight.shape[:2], 1), -self.magnitude)
        half = self.kernel_size**2 // 2
        taps = torch.cat([self.weight[..., :half], centre, self.weight[..., half:]], dim=-1)
        return taps.view(*self.weight.shape[:2], self.kernel_size, self.kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.kernel().to(x.dtype), padding=self.kernel_size // 2)


def _projection_head(channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(channels, channels, 1), nn.LeakyReLU(), nn.Conv2d(channels, channels // 2, 1))


class FCN(nn.Module):
    """One view's network: ``pre_filter`` -> encoder (timm, ``features_only``: the four stages at strides 4, 8,
    16, 32) -> C1 decoder with FCN-16s fusion (stride-32 features upsampled onto the stride-16 ones, concatenated,
    3x3 conv + BN + ReLU to a quarter of the last stage's width, 1x1 conv to one logit).

    Returns ``(map, volume_logits)``: the sigmoid manipulation map at stride 16, ``(B, 1, h, w)``, and the logits of
    the inconsistency volume at stage ``volume_block`` (stride 8), ``(B, H, W, H, W)``. Patch i and j's
    inconsistency is ``1 - sigmoid(<p1(f_i), p2(f_j)> / sqrt(d))`` = ``sigmoid(volume_logits)``, d the projection
    width (half the stage's width), p1 and p2 two projection heads (official ``share_embed_head: false``).
    """

    def __init__(self, pre_filter: nn.Module, encoder: str = "resnet50", pretrained: bool = False,
                 encoder_kwargs: dict | None = None, volume_block: int = 1):
        super().__init__()
        import timm

        self.pre_filter = pre_filter
        try:
            self.encoder = timm.create_model(encoder, pretrained=pretrained, features_only=True,
                                             out_indices=(1, 2, 3, 4), **(encoder_kwargs or {}))
        except Exception as err:  # no internet for hub weights: say which and how to train without them
            if not pretrained:
                raise
            raise MissingWeightsError(
                f"could not load ImageNet weights for the timm encoder {encoder!r} ({err}).\n  With internet timm "
                f"downloads them once into the Hugging Face cache; offline, copy that cache entry here, or set "
                f"model.init_args.network.init_args.pretrained=false to train from random weights.") from err
        channels = self.encoder.feature_info.channels()
        if not 0 <= volume_block < 4:
            raise ValueError(f"volume_block must be 0, 1, 2 or 3 (an encoder stage), not {volume_block}")
        self.volume_block = volume_block
        self.decoder = nn.Sequential(nn.Conv2d(channels[2] + channels[3], channels[3] // 4, 3, padding=1, bias=False),
                                     nn.BatchNorm2d(channels[3] // 4), nn.ReLU(inplace=True),
                                     nn.Conv2d(channels[3] // 4, 1, 1))
        self.head1 = _projection_head(channels[volume_block])
        self.head2 = _projection_head(channels[volume_block])
        self.volume_scale = (channels[volume_block] // 2) ** 0.5

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.encoder(self.pre_filter(x))
        stride16, stride32 = features[2], features[3]
        stride32 = F.interpolate(stride32, size=stride16.shape[-2:], mode="bilinear", align_corners=False)
        manipulation_map = self.decoder(torch.cat([stride16, stride32], 1)).sigmoid()
        return manipulation_map, self.volume_logits(features[self.volume_block])

    def volume_logits(self, block: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, H, W)`` logits of the inconsistency volume of a feature map ``(B, C, H, W)``."""
        e1, e2 = self.head1(block).flatten(2), self.head2(block).flatten(2)  # (B, d, HW)
        h, w = block.shape[-2:]
        similarity = torch.bmm(e1.transpose(1, 2), e2) / self.volume_scale
        return (-similarity).view(-1, h, w, h, w)


class MultiViewFCN(nn.Module):
    """The same FCN once per view (separate weights): ``rgb`` (identity), ``srm`` (:class:`SRMFilter`), ``bayar``
    (:class:`BayarConv2d`). Official ``EnsembleModel`` over ``get_single_modal_model``.

    Args:
        views: which views, any of ``rgb``, ``srm``, ``bayar`` (paper: all three).
        encoder: a timm model name with ``features_only`` support (paper: ``resnet50``).
        pretrained: load timm's ImageNet weights (the official encoder is ImageNet-initialised).
        encoder_kwargs: extra timm arguments (e.g. ``channels`` of a narrow ResNet for CPU runs).
        volume_block: encoder stage of the consistency volume (official ``volume_block_idx: 1``, stride 8).
        srm_clip: SRM residual clip (official ``srm_clip: 5``). bayar_magnitude: official 1.
    Returns from ``forward``: ``{view: (map, volume_logits)}``.
    """

    def __init__(self, views: Sequence[str] = VIEWS, encoder: str = "resnet50", pretrained: bool = False,
                 encoder_kwargs: dict | None = None, volume_block: int = 1, srm_clip: float = 5.0,
                 bayar_magnitude: float = 1.0):
        super().__init__()
        unknown = set(views) - set(VIEWS)
        if unknown or not views:
            raise ValueError(f"views must be a non-empty subset of {VIEWS}, got {list(views)}")
        filters = {"rgb": nn.Identity, "srm": lambda: SRMFilter(srm_clip),
                   "bayar": lambda: BayarConv2d(3, 5, bayar_magnitude)}
        self.views = tuple(views)
        self.streams = nn.ModuleDict({v: FCN(filters[v](), encoder, pretrained, encoder_kwargs, volume_block)
                                      for v in self.views})

    def forward(self, x: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {view: stream(x) for view, stream in self.streams.items()}
