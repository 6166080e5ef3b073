"""Metric factories over torchmetrics, so every paper reports the same quantity the same way.

All metrics are torchmetrics ``Metric`` objects: they accumulate per batch and reduce across processes
(DDP) in ``compute()``.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from scipy import linalg
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

__all__ = ["accuracy", "mean_iou", "mean_average_precision", "FrechetDistance", "inception_fid", "frechet_distance"]


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


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(C1 + C2 - 2 (C1 C2)^(1/2)), the FID formula (Heusel et al. 2017)."""
    covmean, _ = linalg.sqrtm(cov1 @ cov2, disp=False)
    if not np.isfinite(covmean).all():  # singular product: regularise as the reference implementation does
        offset = np.eye(cov1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((cov1 + offset) @ (cov2 + offset))
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(cov1) + np.trace(cov2) - 2 * np.trace(covmean))


class FrechetDistance(Metric):
    """Fréchet distance between real and generated samples in the feature space of ``feature_extractor``.

    ``update(images, real=...)`` embeds the images (or takes features directly when the extractor is
    ``nn.Identity``) and accumulates sums in float64, so the result does not depend on batching or on the
    number of processes. Name the logged value after the extractor: it is only an FID with Inception-v3.
    """

    full_state_update = False

    def __init__(self, feature_extractor: nn.Module, num_features: int, **kwargs):
        super().__init__(**kwargs)
        self.feature_extractor = feature_extractor.eval().requires_grad_(False)
        for side in ("real", "fake"):
            self.add_state(f"{side}_n", torch.tensor(0, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{side}_sum", torch.zeros(num_features, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{side}_outer", torch.zeros(num_features, num_features, dtype=torch.float64),
                           dist_reduce_fx="sum")

    def update(self, images: torch.Tensor, real: bool) -> None:
        with torch.no_grad():
            feats = self.feature_extractor(images).double().flatten(1)
        side = "real" if real else "fake"
        setattr(self, f"{side}_n", getattr(self, f"{side}_n") + feats.shape[0])
        setattr(self, f"{side}_sum", getattr(self, f"{side}_sum") + feats.sum(0))
        setattr(self, f"{side}_outer", getattr(self, f"{side}_outer") + feats.T @ feats)

    def _moments(self, side: str) -> tuple[np.ndarray, np.ndarray]:
        n = getattr(self, f"{side}_n")
        if n < 2:
            raise ValueError(f"FrechetDistance needs at least 2 {side} samples, got {int(n)}")
        mu = getattr(self, f"{side}_sum") / n
        cov = (getattr(self, f"{side}_outer") - n * torch.outer(mu, mu)) / (n - 1)
        return mu.cpu().numpy(), cov.cpu().numpy()

    def compute(self) -> torch.Tensor:
        return torch.tensor(frechet_distance(*self._moments("real"), *self._moments("fake")))


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
