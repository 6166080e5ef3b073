"""WSCL: weakly-supervised self-consistency learning for image manipulation detection (Zhai et al., ICCV 2023;
official code ``yhZhai/WSCL``, ``configs/final.yaml``). Training sees image-level labels only (y = 1 manipulated).

Three views v of the image (RGB, SRM noise, Bayar conv) each get an FCN that outputs a manipulation map M_v.

- Image score by adaptive (Otsu) pooling: s_v = mean of the top-k values of M_v, with k = n - max(t, n//2 + 1), t the
  Otsu split of the sorted map (so fewer than half of the n pixels are pooled); L_cls = sum_v BCE(s_v, y), on the
  stride-16 map itself (official ``loss_on_mid_map``).
- Multi-source consistency (MSC): P = 1[sum_v w_v M_v > 0.5] with w = (1, 2, 2) / 5, detached; on a manipulated
  image with no pixel above 0.5 the argmax pixel(s) become 1; on an authentic image P = 0.
  L_msc = sum_v MSE(M_v, P).
- Inter-patch consistency (IPC): per view, V_ij = 1 - sigmoid(<p1(f_i), p2(f_j)> / sqrt(d)) over all pairs of
  stride-8 patches; its target is whether P (resized to the patches, > 0.5) differs between i and j:
  L_ipc = sum_v BCE(V, P_i xor P_j).
- L = L_cls + r(t) (0.1 L_msc + 0.1 L_ipc), with the Gaussian ramp-up r(t) = exp(-5 (1 - t)^2), t = training progress.

Evaluation: the ensemble map sum_v w_v M_v (upsampled to the image) and score sum_v w_v s_v: image AUC, and on the
manipulated images pixel F1 at 0.5 (per image, averaged) and pixel AUC (all their pixels pooled).
The image-label-only baseline is this module with ``msc_weight: 0`` and ``ipc_weight: 0``.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric
from torchmetrics.classification import BinaryAUROC

from zoo.core.data import normalise_images
from zoo.core.datasets import IMAGENET_MEAN, IMAGENET_STD
from zoo.core.module import ZooModule

from .networks import MultiViewFCN

__all__ = ["WSCL", "binary_cross_entropy", "gaussian_rampup", "ipc_loss", "msc_pseudo_map", "otsu_pool", "otsu_split", "pixel_f1",
           "wscl_loss"]


def otsu_split(values: torch.Tensor) -> torch.Tensor:
    """The official ``get_otsu_k`` per row of ``values`` ``(B, n)``: a greedy search, started at n // 2, of the
    split p (the lowest p values | the rest of the ascending values) that minimises the within-class variance
    ``p/n var(low) + (1 - p/n) var(high)`` (unbiased variances). It first tries one step left: if that does not
    raise the variance the search walks left (and never right); otherwise it walks right while it does not rise."""
    n = values.shape[1]
    ascending = values.detach().double().sort(1).values
    pivots = torch.arange(1, n, device=values.device, dtype=torch.float64)  # split p: [:p] | [p:], at index p - 1
    s1, s2 = ascending.cumsum(1)[:, :-1], ascending.square().cumsum(1)[:, :-1]
    t1, t2 = ascending.sum(1, keepdim=True) - s1, ascending.square().sum(1, keepdim=True) - s2
    nan = torch.tensor(math.nan, dtype=torch.float64, device=values.device)  # torch.var of one value
    low_var = torch.where(pivots > 1, (s2 - s1.square() / pivots) / (pivots - 1).clamp(min=1), nan)
    high_var = torch.where(pivots < n - 1, (t2 - t1.square() / (n - pivots)) / (n - pivots - 1).clamp(min=1), nan)
    # the official search accepts a nan variance (nan > best is False): -inf does the same here
    within = torch.nan_to_num(pivots / n * low_var + (1 - pivots / n) * high_var, nan=-math.inf)
    middle = n // 2
    went_left = (within[:, middle - 2] <= within[:, middle - 1]) if middle >= 2 else torch.zeros_like(within[:, 0], dtype=torch.bool)
    stop = torch.ones_like(within[:, :1], dtype=torch.bool)  # the walk also ends at split 1 (left) or n - 1 (right)
    # each walk stops before the first split (going outwards from the middle) whose variance is above its neighbour's
    rises_right = torch.cat([within[:, middle:] > within[:, middle - 1 : -1], stop], 1)
    rises_left = torch.cat([(within[:, : middle - 1] > within[:, 1:middle]).flip(1), stop], 1)
    return torch.where(went_left, middle - rises_left.float().argmax(1), middle + rises_right.float().argmax(1))


def otsu_pool(maps: torch.Tensor, portion: float = 1.0) -> torch.Tensor:
    """Adaptive pooling of maps ``(B, ...)`` to image scores ``(B,)`` (official ``MainModel`` with ``otsu_sel``): the
    mean of the ``max(1, int((n - max(t, n//2 + 1)) * portion))`` largest values, ``t`` = :func:`otsu_split`; so fewer
    than half of the n pixels are pooled, fewer still when the Otsu split lies right of the middle."""
    values = maps.flatten(1)
    n = values.shape[1]
    split = otsu_split(values) if n > 1 else torch.zeros(values.shape[0], dtype=torch.long, device=values.device)
    k = (((n - torch.clamp(split, min=n // 2 + 1)) * portion).long()).clamp(min=1)
    top = values.sort(1, descending=True).values
    keep = torch.arange(n, device=values.device) < k[:, None]
    return (top * keep).sum(1) / k


def msc_pseudo_map(maps: Sequence[torch.Tensor], weights: Sequence[float], labels: torch.Tensor) -> torch.Tensor:
    """MSC's binary target (official ``MultiViewConsistencyLoss``, ``soft: false``): the weighted sum of the views'
    maps above 0.5; a manipulated image with nothing above 0.5 gets its maximum pixel(s); authentic images 0."""
    with torch.no_grad():
        ensemble = sum(w * m.float() for w, m in zip(weights, maps))
        flat = ensemble.flatten(1)
        peak = flat.max(1, keepdim=True).values
        force_peak = (peak <= 0.5) & (labels.view(-1, 1) == 1)
        flat = torch.where(force_peak & (flat == peak), torch.ones_like(flat), flat)
        target = (flat > 0.5).float() * (labels.view(-1, 1) == 1)
    return target.view_as(ensemble)


def ipc_loss(volume_logits: torch.Tensor, pseudo_map: torch.Tensor) -> torch.Tensor:
    """IPC with the ensemble source (official ``VolumeMaskLoss`` on ``tgt_map``): BCE between the inconsistency
    volume ``(B, H, W, H, W)`` and 1 where the pseudo-map, bilinearly resized to (H, W) and binarised at 0.5,
    differs between the two patches. Computed from logits (the official BCE on sigmoids clamps log at -100)."""
    h, w = volume_logits.shape[1:3]
    patches = (F.interpolate(pseudo_map, size=(h, w), mode="bilinear", align_corners=False) > 0.5).float().flatten(1)
    differs = patches[:, :, None] * (1 - patches[:, None, :]) + (1 - patches[:, :, None]) * patches[:, None, :]
    return F.binary_cross_entropy_with_logits(volume_logits.float().flatten(1, 2).flatten(2), differs)


def binary_cross_entropy(probabilities: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """BCE on probabilities in float32 with logs clamped at -100, as ``F.binary_cross_entropy`` (which refuses to
    run under autocast; the Otsu-pooled scores have no logits to use instead)."""
    p, y = probabilities.float(), targets.float()
    return -(y * p.log().clamp(min=-100) + (1 - y) * (-p).log1p().clamp(min=-100)).mean()


def wscl_loss(maps: Sequence[torch.Tensor], scores: Sequence[torch.Tensor], volume_logits: Sequence[torch.Tensor],
              labels: torch.Tensor, ensemble_weights: Sequence[float], msc_weight: float, ipc_weight: float,
              ramp: float) -> dict[str, torch.Tensor]:
    """The official ``BundledLoss`` with ``final.yaml``, per view v: BCE(score_v, y) + ramp * (msc_weight *
    MSE(M_v, P) + ipc_weight * IPC_v), P the MSC pseudo-map. The IPC terms are computed even at weight 0 (so the
    baseline's projection heads get zero gradients, not none)."""
    classification = sum(binary_cross_entropy(s, labels) for s in scores)
    pseudo_map = msc_pseudo_map(maps, ensemble_weights, labels)
    msc = sum(F.mse_loss(m, pseudo_map) for m in maps)
    ipc = sum(ipc_loss(v, pseudo_map) for v in volume_logits)
    loss = classification + ramp * (msc_weight * msc + ipc_weight * ipc)
    return {"loss": loss, "cls_loss": classification, "msc_loss": msc, "ipc_loss": ipc,
            "pseudo_fraction": pseudo_map.mean()}


def gaussian_rampup(progress: float, steepness: float = 5.0) -> float:
    """exp(-steepness (1 - progress)^2): official ``BundledLoss`` with ``mvc_time_dependent``, progress =
    epoch / max_epoch."""
    return math.exp(-steepness * (1.0 - progress) ** 2)


def pixel_f1(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image F1 of binary maps ``(B, ...)``: 2TP / (2TP + FP + FN + 1e-6) (official ``calculate_pixel_f1``)."""
    prediction, target = prediction.flatten(1).bool(), target.flatten(1).bool()
    tp = (prediction & target).sum(1).double()
    fp, fn = (prediction & ~target).sum(1), (~prediction & target).sum(1)
    return 2 * tp / (2 * tp + fp + fn + 1e-6)


class WSCL(ZooModule):
    """Args (defaults: official ``configs/final.yaml`` and ``opt.py``):
        network: a :class:`~zoo.wscl.networks.MultiViewFCN`.
        ensemble_weights: MSC / ensemble weight per view, normalised to sum 1 (``mvc_single_weight: [1, 2, 2]``).
        msc_weight: MSC weight (``mvc_weight: 0.1``); ipc_weight: IPC weight (``consistency_weight: 0.1``).
        rampup_steepness: the ramp-up's 5 (``mvc_steepness``); rampup: apply it (``mvc_time_dependent: true``).
        otsu_portion: fraction of the Otsu foreground pooled (``otsu_portion: 1``).
        mask_threshold: binarisation of the evaluation map (``mask_threshold: 0.5``).
        Base defaults changed: AdamW, lr 1e-4, weight decay 5e-4 on every parameter, cosine to 0, no EMA.
    """

    expected_metrics = ("val/image_auc", "val/pixel_f1", "val/pixel_auc")

    def __init__(self, network: MultiViewFCN, ensemble_weights: Sequence[float] = (1.0, 2.0, 2.0),
                 msc_weight: float = 0.1, ipc_weight: float = 0.1, rampup_steepness: float = 5.0, rampup: bool = True,
                 otsu_portion: float = 1.0, mask_threshold: float = 0.5, optimizer: str = "adamw", lr: float = 1e-4,
                 weight_decay: float = 5e-4, decay_norm_and_bias: bool = True, cosine_cycles: float = 0.5,
                 ema_decay: float | None = None, **base):
        super().__init__(network, optimizer=optimizer, lr=lr, weight_decay=weight_decay,
                         decay_norm_and_bias=decay_norm_and_bias, cosine_cycles=cosine_cycles, ema_decay=ema_decay, **base)
        if len(ensemble_weights) != len(network.views) or min(ensemble_weights) < 0 or sum(ensemble_weights) <= 0:
            raise ValueError(f"ensemble_weights needs one non-negative weight per view {network.views}, "
                             f"not {list(ensemble_weights)}")
        total = float(sum(ensemble_weights))
        self.ensemble_weights = [w / total for w in ensemble_weights]
        self.msc_weight, self.ipc_weight = msc_weight, ipc_weight
        self.rampup_steepness, self.rampup, self.otsu_portion = rampup_steepness, rampup, otsu_portion
        self.mask_threshold = mask_threshold
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.val_image_auc, self.val_pixel_auc = BinaryAUROC(), BinaryAUROC()
        self.val_pixel_f1 = MeanMetric()
        # with ipc_weight 0 (the image-label baseline) the projection heads are built but untrained
        self.zero_grad_parameters = () if ipc_weight else tuple(f"network.streams.{v}.head" for v in network.views)

    def ramp(self) -> float:
        if not self.rampup:
            return 1.0
        progress = self.global_step / max(1, int(self.trainer.estimated_stepping_batches))
        return gaussian_rampup(progress, self.rampup_steepness)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        # the batch holds images and image-level labels only: masks never reach training (tests/test_wscl.py)
        images = normalise_images(batch["image"], self.pixel_mean, self.pixel_std)
        labels = batch["label"].float()
        outputs = self.network(images)
        maps = [outputs[v][0].float() for v in self.network.views]  # losses in float32 under bf16 autocast
        scores = [otsu_pool(m, self.otsu_portion) for m in maps]
        ramp = self.ramp()
        losses = wscl_loss(maps, scores, [outputs[v][1] for v in self.network.views], labels, self.ensemble_weights,
                           self.msc_weight, self.ipc_weight, ramp)
        self.log_dict({f"train/{k}": v for k, v in losses.items()} | {"train/ramp": ramp})
        return losses["loss"]

    def predict_maps(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Ensemble image scores ``(B,)`` and maps ``(B, 1, H, W)`` at the input size (official ``EnsembleModel``
        with ``seg_size``: each view's map upsampled bilinearly and clamped, then weighted)."""
        outputs = self.network(normalise_images(images, self.pixel_mean, self.pixel_std))
        scores, maps = 0.0, 0.0
        for w, view in zip(self.ensemble_weights, self.network.views):
            stride16 = outputs[view][0].float()
            scores = scores + w * otsu_pool(stride16, self.otsu_portion)
            full = F.interpolate(stride16, size=images.shape[-2:], mode="bilinear", align_corners=False)
            maps = maps + w * full.clamp(0, 1)
        return scores, maps

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        scores, maps = self.predict_maps(batch["image"])
        labels = batch["label"].long()
        self.val_image_auc.update(scores, labels)
        manipulated = labels == 1
        if manipulated.any():
            masks = batch["mask"][manipulated] > 0
            self.val_pixel_f1.update(pixel_f1(maps[manipulated, 0] > self.mask_threshold, masks))
            self.val_pixel_auc.update(maps[manipulated, 0].flatten(), masks.flatten().long())
        self.log("val/image_auc", self.val_image_auc, prog_bar=True)
        self.log("val/pixel_f1", self.val_pixel_f1, prog_bar=True)
        self.log("val/pixel_auc", self.val_pixel_auc)
