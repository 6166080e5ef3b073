"""TS2Vec's encoder (Yue et al., 2022), as COMET uses it: an input projection, timestamp masking, and a stack of
residual dilated-convolution blocks (dilation 2**i) that keeps one representation per timestamp.

Follows ``models/encoder.py`` and ``models/dilated_conv.py`` of DL4mHealth/COMET (the TS2Vec code). The parameter
names are the official ones, so an official ``TSEncoder`` state dict loads into :class:`TS2VecEncoder` as it is.
Inputs are channels-first ``(B, C, L)`` (the zoo's arrays); the output is ``(B, L, output_dims)``, timestamps
before features, as the official losses expect.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["TS2VecEncoder", "continuous_mask", "binomial_mask", "max_pool_over_time"]


def continuous_mask(batch: int, length: int, spans: int = 5, span_fraction: float = 0.1,
                    device: torch.device | None = None) -> torch.Tensor:
    """TS2Vec's ``generate_continuous_mask``: per sample, ``spans`` (at most L // 2) random stretches of
    ``int(span_fraction * L)`` (at least 1) timestamps are set False (masked). Drawn from torch's generator (the
    official code draws from numpy's) so that the run's seed and a resumed run's random state govern it."""
    spans = max(min(spans, length // 2), 1)
    span = max(int(span_fraction * length), 1)
    starts = torch.randint(0, length - span + 1, (batch, spans), device=device)
    position = torch.arange(length, device=device)
    inside = (position >= starts[..., None]) & (position < starts[..., None] + span)  # (B, spans, L)
    return ~inside.any(1)


def binomial_mask(batch: int, length: int, p: float = 0.5, device: torch.device | None = None) -> torch.Tensor:
    """TS2Vec's ``generate_binomial_mask``: each timestamp kept with probability ``p``."""
    return torch.rand(batch, length, device=device) < p


def max_pool_over_time(h: torch.Tensor) -> torch.Tensor:
    """``(B, L, D) -> (B, D)``: the official ``eval_with_pooling`` (max over all timestamps)."""
    return h.amax(1)


class _SamePadConv(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, dilation: int):
        super().__init__()
        receptive_field = (kernel_size - 1) * dilation + 1
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, padding=receptive_field // 2, dilation=dilation)
        self.remove = 1 if receptive_field % 2 == 0 else 0  # an even field pads one step too many

    def forward(self, x):
        out = self.conv(x)
        return out[:, :, : out.shape[-1] - self.remove]


class _ConvBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, dilation: int, final: bool):
        super().__init__()
        self.conv1 = _SamePadConv(in_channels, out_channels, kernel_size, dilation)
        self.conv2 = _SamePadConv(out_channels, out_channels, kernel_size, dilation)
        self.projector = nn.Conv1d(in_channels, out_channels, 1) if in_channels != out_channels or final else None

    def forward(self, x):
        residual = x if self.projector is None else self.projector(x)
        return self.conv2(F.gelu(self.conv1(F.gelu(x)))) + residual


class _DilatedConvEncoder(nn.Module):
    def __init__(self, in_channels: int, channels: list[int], kernel_size: int):
        super().__init__()
        self.net = nn.Sequential(*[
            _ConvBlock(channels[i - 1] if i else in_channels, channels[i], kernel_size, dilation=2 ** i,
                       final=i == len(channels) - 1)
            for i in range(len(channels))])

    def forward(self, x):
        return self.net(x)


class TS2VecEncoder(nn.Module):
    """Per-timestamp representations of a multivariate series.

    Args:
        input_dims: channels of the series (16 for AD's EEG, 1 for a UCR set).
        output_dims: representation size; 320 in TS2Vec and COMET (``config_files/*_Configs.py``).
        hidden_dims: width of the dilated blocks; 64 (``TSEncoder`` default).
        depth: number of hidden residual blocks (one more maps to ``output_dims``); 10 (configs).
        dropout: on the representations; 0.1 (``repr_dropout``).
    """

    def __init__(self, input_dims: int, output_dims: int = 320, hidden_dims: int = 64, depth: int = 10,
                 dropout: float = 0.1):
        super().__init__()
        self.input_dims, self.output_dims = input_dims, output_dims
        self.input_fc = nn.Linear(input_dims, hidden_dims)
        self.feature_extractor = _DilatedConvEncoder(hidden_dims, [hidden_dims] * depth + [output_dims], 3)
        self.repr_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: str | None = None) -> torch.Tensor:
        """``x``: ``(B, C, L)``. ``mask``: ``all_true`` (no masking), ``continuous`` or ``binomial``; ``None`` is
        the official default, ``binomial`` in training (the fine-tuning classifier runs so) and ``all_true`` in
        evaluation. Masked timestamps are zeroed after the input projection."""
        h = self.input_fc(x.transpose(1, 2))  # B x L x hidden
        batch, length = h.shape[:2]
        mask = mask or ("binomial" if self.training else "all_true")
        if mask == "continuous":
            h = h * continuous_mask(batch, length, device=h.device)[..., None]
        elif mask == "binomial":
            h = h * binomial_mask(batch, length, device=h.device)[..., None]
        elif mask != "all_true":
            raise ValueError(f"unknown mask {mask!r}; use all_true, continuous or binomial")
        h = self.repr_dropout(self.feature_extractor(h.transpose(1, 2)))  # B x output_dims x L
        return h.transpose(1, 2)
