"""Scalbert, Vakalopoulou & Couzinié-Devy, *Towards domain-invariant Self-Supervised Learning with Batch Styles
Standardization* (ICLR 2024): every view batch takes the low-frequency Fourier amplitude ("style") of one of its own
images, so an SSL objective cannot tell images apart by domain style; plugged into the ssl family's SimCLR and BYOL."""
from .module import BSSBYOL, BSSSimCLR, BatchStylesStandardization, low_frequency_mask, standardize_styles

__all__ = ["BSSBYOL", "BSSSimCLR", "BatchStylesStandardization", "low_frequency_mask", "standardize_styles"]
