"""Batch Styles Standardization (BSS; Scalbert et al., ICLR 2024, Sec. 3 and Appendix A, Algorithm 1) on the ssl
family's SimCLR (contrastive) and BYOL (non-contrastive) hosts.

For each view batch ``{X_i}``, BSS draws an area ratio ``r ~ U(r_min, r_max)`` and one image ``X_k`` of the batch, then
gives every image the amplitude of ``X_k`` inside the centred low-frequency square whose area is ``r`` times the
spectrum's, keeping its own phase and the rest of its own amplitude:
``X^_i = F^-1( A'_i exp(j P_i) )``, ``A'_i = M_r * A(X_k) + (1 - M_r) * A(X_i)``. The amplitude swap is the one of
FDA (Yang & Soatto, CVPR 2020, ``utils.FDA_source_to_target_np``), applied batch-wide with a style drawn from the
batch itself: no domain labels anywhere. Each view of the batch gets its own draw (its own style and ``r``).

Where it runs: on the device, inside ``ssl_step``, on the finished views of the family's augmentation pipeline
(crop, flip, colour jitter, grayscale, blur, solarisation), because it needs the whole batch. The views arrive
normalised; BSS works on the [0, 1] images (the DC amplitude is the mean brightness, which normalisation would turn
into a signed quantity), clamps back to [0, 1] and normalises again. The FFTs run in float32 with autocast off.
Under DDP the style image is drawn from the *global* batch (every rank computes the same draw from
``(torch.initial_seed(), global_step, view)``; the owning rank broadcasts the image), so the global batch, whose
negatives SimCLR gathers, shares one style as on one device.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from zoo.core.distributed import rank_and_world
from zoo.ssl.hosts import BYOL, SimCLR

__all__ = ["low_frequency_mask", "standardize_styles", "BatchStylesStandardization", "BSSSimCLR", "BSSBYOL"]


def low_frequency_mask(height: int, width: int, area_ratio: float, device=None) -> torch.Tensor:
    """Boolean (height, width) mask of the centred low-frequency square of ``area_ratio`` of the spectrum, in
    ``torch.fft.fft2``'s (unshifted) layout. Its sides are ``round(sqrt(r) * H)`` x ``round(sqrt(r) * W)`` (at least
    the DC term), centred on FDA's centre ``floor(H / 2)`` after ``fftshift``: an odd side ``2b + 1`` is FDA's
    ``[c - b, c + b]`` block."""
    side_h = min(height, max(1, round(math.sqrt(area_ratio) * height)))
    side_w = min(width, max(1, round(math.sqrt(area_ratio) * width)))
    top, left = height // 2 - side_h // 2, width // 2 - side_w // 2
    centred = torch.zeros(height, width, dtype=torch.bool, device=device)
    centred[top : top + side_h, left : left + side_w] = True
    return torch.fft.ifftshift(centred)


def standardize_styles(images: torch.Tensor, style: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Every image of ``images`` (N, C, H, W, in [0, 1]) with ``style``'s (C, H, W) Fourier amplitude inside ``mask``
    (per channel), its own phase and its own amplitude elsewhere; the real part, clamped to [0, 1]. float32."""
    with torch.autocast(images.device.type, enabled=False):
        spectrum = torch.fft.fft2(images.float())
        style_amplitude = torch.fft.fft2(style.float()).abs()
        amplitude = torch.where(mask, style_amplitude, spectrum.abs())
        standardized = torch.fft.ifft2(torch.polar(amplitude, spectrum.angle())).real
        return standardized.clamp(0, 1)


class BatchStylesStandardization:
    """The BSS step shared by :class:`BSSSimCLR` and :class:`BSSBYOL`: mixed in before the host, it standardises the
    styles of each view batch named in ``view_names`` and hands the batch on to the host's ``ssl_step``."""

    bss_p: float
    area_ratio: tuple[float, float]

    def configure_bss(self, bss_p: float, area_ratio: tuple[float, float]) -> None:
        if not 0 <= bss_p <= 1:
            raise ValueError(f"bss_p must be in [0, 1], got {bss_p}")
        if not 0 < area_ratio[0] <= area_ratio[1] <= 1:
            raise ValueError(f"area_ratio must satisfy 0 < r_min <= r_max <= 1, got {area_ratio}")
        self.bss_p, self.area_ratio = bss_p, tuple(area_ratio)
        self.pixel_mean: torch.Tensor | None = None  # the data module's normalisation, 0..255 scale
        self.pixel_std: torch.Tensor | None = None

    def setup(self, stage: str) -> None:
        super().setup(stage)
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None:
            self.pixel_mean, self.pixel_std = datamodule.mean, datamodule.std

    def style_draw(self, view_index: int, world: int, local_batch: int) -> tuple[bool, float, int, int]:
        """(apply?, r, owner rank, index on the owner) for view ``view_index`` at this step: the same on every rank
        and after a resume (a function of the seed, the step and the view only)."""
        rng = np.random.default_rng([torch.initial_seed(), self.global_step, view_index])
        apply, r = rng.random() < self.bss_p, rng.uniform(*self.area_ratio)
        return apply, float(r), int(rng.integers(world)), int(rng.integers(local_batch))

    def standardize_views(self, batch: dict) -> tuple[dict, float]:
        """``batch`` with each view standardised (or left as it is with probability ``1 - bss_p``), and the mean
        area ratio applied (0 when none was)."""
        if self.pixel_mean is None:
            raise RuntimeError(f"{type(self).__name__} reads the data module's normalisation (mean, std) in setup; "
                               "set pixel_mean / pixel_std (0..255 scale) to step it outside a Trainer")
        rank, world = rank_and_world()
        batch, ratios = dict(batch), []
        for view_index, name in enumerate(self.view_names):
            views = batch[name]
            apply, r, owner, index = self.style_draw(view_index, world, len(views))
            if not apply:
                continue
            mean, std = self.pixel_mean.to(views.device), self.pixel_std.to(views.device)
            images = ((views.float() * std + mean) / 255).clamp(0, 1)
            style = images[index].clone()  # its own buffer: the broadcast writes into it on the other ranks
            if world > 1:
                dist.broadcast(style, src=owner)
            mask = low_frequency_mask(*images.shape[-2:], r, device=images.device)
            standardized = standardize_styles(images, style, mask)
            batch[name] = ((standardized * 255 - mean) / std).to(views.dtype).contiguous(
                memory_format=torch.channels_last)
            ratios.append(r)
        return batch, float(np.mean(ratios)) if ratios else 0.0

    def ssl_step(self, batch: dict):
        batch, area_ratio = self.standardize_views(batch)
        loss, features, logs = super().ssl_step(batch)
        return loss, features, {**logs, "bss_area_ratio": area_ratio}


class BSSSimCLR(BatchStylesStandardization, SimCLR):
    """SimCLR with Batch Styles Standardization (the paper's "CLaSSy" in its arXiv v1-v5): NT-Xent over views whose
    batches share one style each, so negatives cannot be told apart by domain style.

    Args:
        bss_p: probability that a view batch is standardised (1.0: always, as Algorithm 1; 0.0: plain SimCLR, the
            baseline).
        area_ratio: ``(r_min, r_max)`` of ``r ~ U(r_min, r_max)``, the area of the swapped low-frequency square over
            the spectrum's (Algorithm 1's inputs). The default (0.01, 0.2) is ours: we could not read the paper's
            values (see zoo/bss/README.md).
        The rest are SimCLR's (``zoo.ssl.hosts.SimCLR``) and the ssl host's.
    """

    def __init__(self, network: nn.Module, bss_p: float = 1.0, area_ratio: tuple[float, float] = (0.01, 0.2),
                 **host):
        super().__init__(network, **host)
        self.configure_bss(bss_p, area_ratio)


class BSSBYOL(BatchStylesStandardization, BYOL):
    """BYOL with Batch Styles Standardization: the non-contrastive case (the paper shows it on SwAV and MSN; BYOL is
    the family's non-contrastive host). Both the online and the target network see the standardised views.

    Args:
        bss_p, area_ratio: as :class:`BSSSimCLR`.
        The rest are BYOL's (``zoo.ssl.hosts.BYOL``) and the ssl host's.
    """

    def __init__(self, network: nn.Module, bss_p: float = 1.0, area_ratio: tuple[float, float] = (0.01, 0.2),
                 **host):
        super().__init__(network, **host)
        self.configure_bss(bss_p, area_ratio)
