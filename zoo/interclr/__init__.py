"""Xie et al., *Delving into Inter-Image Invariance for Unsupervised Visual Representations* (IJCV 2022): InterCLR,
MoCo-v2 plus an inter-image contrastive branch on a memory bank with online k-means labels, semi-hard negatives
and a relaxed cosine margin."""
from .module import InterCLR

__all__ = ["InterCLR"]
