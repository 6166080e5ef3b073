"""MIC: Masked Image Consistency for Context-Enhanced Domain Adaptation (Hoyer et al., CVPR 2023), segmentation.

On top of DAFormer's self-training (``zoo.segda.host.DAFormerSelfTraining``), the student also learns to predict
the EMA teacher's pseudo-labels of a target crop from a *masked* copy of it, so it must use the context of the
visible regions to recover the hidden ones:

    masked = mask(colour_jitter_blur(x_T)),  mask = nearest-upsampled Bernoulli(1 - r) grid of b x b patches
    L_MIC  = lambda * mean_pixels( q_T * CE(student(masked), argmax teacher(x_T)) )

The teacher sees the full (unmasked, un-augmented) target crop; ``q_T`` is the host's quality weight (share of
pixels above 0.968, one scalar per batch), i.e. MIC shares teacher, pseudo-labels and weights with the host
(``mask_alpha='same'``, ``mask_pseudo_threshold='same'``, ``mask_mode='separatetrgaug'`` in lhoyer/MIC
``seg/configs/mic/gtaHR2csHR_mic_hrda.py``). Follows the official code (``seg/mmseg/models/uda/
masking_consistency_module.py``, ``seg/mmseg/models/utils/masking_transforms.py``): the mask grid has
``round(H / b) x round(W / b)`` cells drawn with one ``torch.rand`` (keep where > r), one mask per image shared by
the channels, applied to the normalised, colour-augmented image (masked pixels = 0 = the mean colour); the colour
augmentation draws are fresh at every step. Block size b is 64 at HRDA's 1024 crops and 32 at DAFormer's 512
crops (the official ``experiments.py`` halves it with the resolution); the CPU setting keeps that 1/16 of the crop.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from zoo.segda.host import DAFormerSelfTraining, pixel_cross_entropy

__all__ = ["MIC", "block_mask", "mask_images"]


@torch.no_grad()
def block_mask(images: torch.Tensor, block_size: int, ratio: float) -> torch.Tensor:
    """(B, 1, H, W) keep-mask: a ``round(H/b) x round(W/b)`` grid (at least 1 x 1, where the official code fails
    on images smaller than half a block), each cell kept with p = 1 - ``ratio``."""
    b, _, h, w = images.shape
    cells = max(1, round(h / block_size)), max(1, round(w / block_size))
    grid = (torch.rand(b, 1, *cells, device=images.device) > ratio).float()
    return F.interpolate(grid, size=(h, w), mode="nearest")


def mask_images(images: torch.Tensor, block_size: int, ratio: float) -> torch.Tensor:
    return images * block_mask(images, block_size, ratio)


class MIC(DAFormerSelfTraining):
    """MIC(DAFormer). Defaults are the paper's GTA->Cityscapes setting with DAFormer at 512x512 crops.

    Args:
        network: segmentation network (``SegFormerDAFormer`` for the paper, ``SmallDAFormer`` on CPU).
        mask_block_size: patch size b of the mask grid (32 at 512 crops; 64 at HRDA's 1024 crops).
        mask_ratio: share r of masked patches (0.7).
        mask_lambda: weight of the masked consistency loss (1.0).
        The remaining arguments are the host's (see ``DAFormerSelfTraining``), with DAFormer's values.
    """

    def __init__(self, network: nn.Module, mask_block_size: int = 32, mask_ratio: float = 0.7,
                 mask_lambda: float = 1.0, **host):
        super().__init__(network, **host)
        self.mask_block_size, self.mask_ratio, self.mask_lambda = mask_block_size, mask_ratio, mask_lambda

    def extra_target_loss(self, target: dict, pseudo_labels: torch.Tensor, pseudo_weight: torch.Tensor):
        masked = mask_images(self.strong(target["image"]), self.mask_block_size, self.mask_ratio)
        loss = self.mask_lambda * pixel_cross_entropy(self.network(masked), pseudo_labels, pseudo_weight)
        if self.global_step % self.log_images_every_n_steps == 0:
            self.log_segmentation("train/masked_target", masked, {"pseudo_label": pseudo_labels})
        return loss, {"train/masked_loss": loss}
