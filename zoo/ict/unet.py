"""A compact NCSN++ U-Net (Song et al., ICLR 2021), the network consistency models use on CIFAR-10.

Follows the configuration of ``openai/consistency_models_cifar10`` (``configs/cifar10_ve_ct_*.py``), which the
iCT paper keeps: BigGAN-style residual blocks with FIR ``[1, 3, 3, 1]`` resampling, skip connections rescaled by
``1/sqrt(2)``, GroupNorm (``min(C // 4, 32)`` groups), SiLU, attention at 16x16, a "residual" progressive input
(the image is downsampled alongside the encoder and merged at every resolution), Gaussian Fourier features of
the noise level followed by two dense layers, and near-zero initialisation of every branch's last layer
(``init_scale=0``, i.e. variance 1e-10). iCT's changes are arguments: ``dropout=0.3`` and ``fourier_scale=0.02``
(down from 16). The FIR filters are written as depthwise (transposed) convolutions, as in EDM's PyTorch port.

Paper size (CIFAR-10): ``model_channels=128, channel_mult=(2, 2, 2), num_blocks=4, attn_resolutions=(16,)``
(55.7M parameters). A CPU-sized net: ``model_channels=16, channel_mult=(1, 2, 2), num_blocks=1``.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["NCSNpp"]

FIR_KERNEL = (1.0, 3.0, 3.0, 1.0)


def _init(layer: nn.Module, scale: float = 1.0) -> nn.Module:
    """score_sde's ``default_init``: variance scaling (fan_avg, uniform); ``scale=0`` means 1e-10. Zero bias."""
    nn.init.xavier_uniform_(layer.weight, gain=math.sqrt(scale or 1e-10))
    nn.init.zeros_(layer.bias)
    return layer


def _conv(c_in: int, c_out: int, kernel: int = 3, scale: float = 1.0, padding: int | None = None) -> nn.Conv2d:
    return _init(nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2 if padding is None else padding), scale)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(channels // 4, 32), channels, eps=1e-6)


class FIR(nn.Module):
    """The separable FIR filter [1, 3, 3, 1] (upfirdn2d, gain 1): 2x ``up``, 2x ``down``, or a ``blur`` that keeps
    the size plus one (padding 2) ahead of a strided 3x3 convolution."""

    def __init__(self, mode: str):
        super().__init__()
        taps = torch.tensor(FIR_KERNEL)
        kernel = torch.outer(taps, taps) / taps.sum() ** 2
        self.register_buffer("kernel", kernel * (4 if mode == "up" else 1), persistent=False)
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.kernel.to(x.dtype).expand(x.shape[1], 1, 4, 4)
        if self.mode == "up":
            return F.conv_transpose2d(x, weight, stride=2, padding=1, groups=x.shape[1])
        if self.mode == "down":
            return F.conv2d(x, weight, stride=2, padding=1, groups=x.shape[1])
        return F.conv2d(x, weight, padding=2, groups=x.shape[1])


class ResBlock(nn.Module):
    """``ResnetBlockBigGANpp``: norm-act-(resample)-conv, + dense(noise embedding), norm-act-dropout-conv."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, dropout: float, resample: str | None = None):
        super().__init__()
        self.norm0, self.conv0 = _norm(c_in), _conv(c_in, c_out)
        self.dense = _init(nn.Linear(emb_dim, c_out))
        self.norm1, self.dropout, self.conv1 = _norm(c_out), nn.Dropout(dropout), _conv(c_out, c_out, scale=0.0)
        self.resample = FIR(resample) if resample else None
        self.skip = _conv(c_in, c_out, kernel=1) if c_in != c_out or resample else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.norm0(x))
        if self.resample is not None:
            h, x = self.resample(h), self.resample(x)
        h = self.conv0(h) + self.dense(F.silu(emb))[:, :, None, None]
        h = self.conv1(self.dropout(F.silu(self.norm1(h))))
        if self.skip is not None:
            x = self.skip(x)
        return (x + h) / math.sqrt(2.0)


class Attention(nn.Module):
    """``AttnBlockpp``: single-head self-attention over pixels, residual, rescaled by ``1/sqrt(2)``."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.qkv = _conv(channels, 3 * channels, kernel=1)
        self.proj = _conv(channels, channels, kernel=1, scale=0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(2, 3).unbind(1)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, c, h, w)
        return (x + self.proj(out)) / math.sqrt(2.0)


class PyramidDown(nn.Module):
    """The progressive-input branch: FIR blur, then a strided 3x3 convolution (score_sde's fused Conv2d down)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.blur = FIR("blur")
        self.conv = _init(nn.Conv2d(c_in, c_out, 3, stride=2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.blur(x))


class NCSNpp(nn.Module):
    """NCSN++ ``F_theta(c_in x, c_noise)``: same shape in and out; ``noise_labels`` is ``c_noise(sigma)``, shape (B,).

    Args:
        img_resolution: input side (a power of two times ``2 ** (len(channel_mult) - 1)``).
        in_channels: image channels (3 for CIFAR-10, 1 for MNIST).
        model_channels: base width ``nf``; level ``i`` has ``nf * channel_mult[i]`` channels.
        channel_mult: width multiplier per resolution level.
        num_blocks: residual blocks per level (the decoder has one more, consuming the encoder's skips).
        attn_resolutions: resolutions with self-attention after each block.
        dropout: dropout in every residual block (iCT: 0.3 on CIFAR-10).
        fourier_scale: std of the frozen Gaussian Fourier frequencies (iCT: 0.02; CM: 16).
    """

    def __init__(self, img_resolution: int = 32, in_channels: int = 3, model_channels: int = 128,
                 channel_mult: tuple[int, ...] = (2, 2, 2), num_blocks: int = 4,
                 attn_resolutions: tuple[int, ...] = (16,), dropout: float = 0.3, fourier_scale: float = 0.02):
        super().__init__()
        nf, emb_dim = model_channels, 4 * model_channels
        self.img_resolution, self.in_channels = img_resolution, in_channels
        self.register_buffer("fourier_freqs", torch.randn(nf) * fourier_scale)  # frozen, as in score_sde
        self.embed = nn.Sequential(_init(nn.Linear(2 * nf, emb_dim)), nn.SiLU(), _init(nn.Linear(emb_dim, emb_dim)))
        block = lambda c_in, c_out, resample=None: ResBlock(c_in, c_out, emb_dim, dropout, resample)  # noqa: E731

        self.conv_in = _conv(in_channels, nf)
        self.encoder, skips = nn.ModuleList(), [nf]
        channels, pyramid_channels, resolution = nf, in_channels, img_resolution
        for level, mult in enumerate(channel_mult):
            for _ in range(num_blocks):
                layers = [block(channels, nf * mult)]
                channels = nf * mult
                if resolution in attn_resolutions:
                    layers.append(Attention(channels))
                self.encoder.append(nn.ModuleList(layers))
                skips.append(channels)
            if level < len(channel_mult) - 1:
                self.encoder.append(nn.ModuleList([block(channels, channels, "down"),
                                                   PyramidDown(pyramid_channels, channels)]))
                pyramid_channels, resolution = channels, resolution // 2
                skips.append(channels)

        self.middle = nn.ModuleList([block(channels, channels), Attention(channels), block(channels, channels)])

        self.decoder = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for _ in range(num_blocks + 1):
                self.decoder.append(block(channels + skips.pop(), nf * mult))
                channels = nf * mult
            if resolution in attn_resolutions:
                self.decoder.append(Attention(channels))
            if level > 0:
                self.decoder.append(block(channels, channels, "up"))
                resolution *= 2
        self.norm_out, self.conv_out = _norm(channels), _conv(channels, in_channels, scale=0.0)

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor) -> torch.Tensor:
        phase = 2 * math.pi * noise_labels[:, None].to(self.fourier_freqs.dtype) * self.fourier_freqs[None]
        emb = self.embed(torch.cat([phase.sin(), phase.cos()], dim=1))

        pyramid = x
        h = self.conv_in(x)
        skips = [h]
        for layers in self.encoder:
            if isinstance(layers[-1], PyramidDown):  # downsampling, merged with the downsampled input pyramid
                h = pyramid = (layers[1](pyramid) + layers[0](h, emb)) / math.sqrt(2.0)
            else:
                h = layers[0](h, emb)
                for attention in layers[1:]:
                    h = attention(h)
            skips.append(h)

        h = self.middle[2](self.middle[1](self.middle[0](h, emb)), emb)

        for layer in self.decoder:
            if isinstance(layer, Attention):
                h = layer(h)
            elif layer.resample is not None:
                h = layer(h, emb)
            else:
                h = layer(torch.cat([h, skips.pop()], dim=1), emb)
        return self.conv_out(F.silu(self.norm_out(h)))
