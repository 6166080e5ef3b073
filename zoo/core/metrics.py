"""Metric factories over torchmetrics, so every paper reports the same quantity the same way.

All metrics are torchmetrics ``Metric`` objects: they accumulate per batch and reduce across processes
(DDP) in ``compute()``.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

__all__ = ["accuracy", "mean_iou", "mean_average_precision", "frechet_distance", "inception_fid"]


def accuracy(num_classes: int, top_k: int = 1) -> Metric:
    """Top-k accuracy over all samples (micro average), as papers report it."""
    return MulticlassAccuracy(num_classes=num_classes, top_k=top_k, average="micro")


def mean_iou(num_classes: int, ignore_index: int | None = 255, per_class: bool = False) -> Metric:
    """Mean (or per-class) intersection over union from a confusion matrix over the whole evaluation set."""
    return MulticlassJaccardIndex(num_classes=num_classes, ignore_index=ignore_index,
                                  average="none" if per_class else "macro")


def mean_average_precision(iou_type: str = "bbox", class_metrics: bool = False) -> Metric:
    """COCO-protocol mAP, mAP50, mAP75 and per-size mAP (faster-coco-eval backend)."""
    from torchmetrics.detection import MeanAveragePrecision

    return MeanAveragePrecision(iou_type=iou_type, class_metrics=class_metrics, backend="faster_coco_eval")


class _FrozenFeatures(nn.Module):
    """A feature extractor as torchmetrics' ``FrechetInceptionDistance`` takes a custom one.

    It reads ``num_features`` (without it, it probes the size with a random 3x299x299 image); the extractor is
    frozen and stays in eval mode whatever its owner's mode; features leave as float64, because the metric returns
    its value in the features' dtype (bf16 features under autocast would round the distance to three digits).
    """

    def __init__(self, extractor: nn.Module, num_features: int):
        super().__init__()
        self.extractor, self.num_features = extractor.eval().requires_grad_(False), num_features

    def train(self, mode: bool = True):
        return super().train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.extractor(images).flatten(1).double()


def frechet_distance(features: nn.Module, num_features: int | None = None) -> Metric:
    """Fréchet distance ``||mu1 - mu2||^2 + Tr(C1 + C2 - 2 (C1 C2)^(1/2))`` (Heusel et al. 2017) between real and
    generated samples in the feature space of ``features``; ``update(images, real=...)``.

    torchmetrics' ``FrechetInceptionDistance`` with a custom extractor: float64 sums of the features and of their
    outer products (independent of batching and of the number of processes), the trace term from the eigenvalues
    of ``C1 C2`` in float64. ``features = nn.Identity()`` takes features directly (then give ``num_features``;
    otherwise it defaults to ``features.num_features``). Name the logged value after the extractor: it is only an
    FID with Inception-v3 (:func:`inception_fid`).
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    num_features = num_features if num_features is not None else features.num_features
    return FrechetInceptionDistance(feature=_FrozenFeatures(features, num_features))


INCEPTION_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"


def inception_fid(feature: int = 2048) -> Metric:
    """The standard FID (torch-fidelity's Inception-v3). Its weights must already be on disk: nothing downloads."""
    hub = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch")) / "hub" / "checkpoints"
    if not (hub / INCEPTION_WEIGHTS).exists():
        raise FileNotFoundError(
            f"FID needs the Inception-v3 weights at {hub / INCEPTION_WEIGHTS}. Download them once from "
            "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_WEIGHTS
            + " (or set TORCH_HOME to where they are).")
    from torchmetrics.image.fid import FrechetInceptionDistance

    return FrechetInceptionDistance(feature=feature, normalize=True)
