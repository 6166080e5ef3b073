"""Exponential moving average of a network, kept as a frozen submodule so it is saved in every checkpoint."""
from __future__ import annotations

import copy
from typing import Literal

import torch
import torch.nn as nn

__all__ = ["EMA"]


class EMA(nn.Module):
    """``ema = decay * ema + (1 - decay) * online`` over parameters, after each optimizer step.

    Buffers (BatchNorm running statistics) are either copied from the online network (``"copy"``: FixMatch and
    USB) or averaged like the parameters (``"average"``: mean-teacher style). Integer buffers are always copied.
    """

    def __init__(self, network: nn.Module, buffers: Literal["copy", "average"] = "copy"):
        super().__init__()
        if buffers not in ("copy", "average"):
            raise ValueError(f"buffers must be 'copy' or 'average', got {buffers!r}")
        self.module = copy.deepcopy(network).requires_grad_(False).eval()
        self.buffers_mode = buffers

    def train(self, mode: bool = True):  # the average never runs in training mode (frozen BN statistics)
        return super().train(False)

    @torch.no_grad()
    def update(self, network: nn.Module, decay: float) -> None:
        ema_params = list(self.module.parameters())
        params = [p.detach() for p in network.parameters()]
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)
        for ema_b, b in zip(self.module.buffers(), network.buffers()):
            if self.buffers_mode == "average" and ema_b.dtype.is_floating_point:
                ema_b.lerp_(b, 1.0 - decay)
            else:
                ema_b.copy_(b)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)
