"""The one-stage detector: torchvision's RetinaNet parts with one anchor per location, and the FAM-3D head.

Built from torchvision where its parts fit: ``resnet_fpn_backbone`` (ResNet-50, frozen BN and stem + layer1 as
mmdet's ``frozen_stages=1, norm_eval=True``) or a small random-init CNN with ``FeaturePyramidNetwork`` for CPU runs,
``LastLevelP6P7`` on P5 (mmdet ``add_extra_convs='on_output'``), ``RetinaNetHead`` (GroupNorm towers) as the plain
head, ``BoxCoder`` with mmdet's target stds (0.1, 0.1, 0.2, 0.2), ``batched_nms``. torchvision's ``RetinaNet``
class itself does not fit: it resizes inside the model (the views are resized, with their boxes, in the data
pipeline), hard-wires static IoU matching in its loss, and expects logits, while FAM-3D outputs decoded boxes.

Both heads return per-prior probabilities (B, N, C) and absolute xyxy boxes (B, N, 4); priors are one square
anchor of side ``octave_base_scale * stride`` centred at ``(x * stride, y * stride)`` (mmdet's AnchorGenerator with
``octave_base_scale=8, scales_per_octave=1, ratios=[1.0]``, the official config).
"""
from __future__ import annotations

from collections import OrderedDict
from functools import partial
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops import batched_nms, deform_conv2d
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelP6P7

__all__ = ["Detector", "FAM3DHead", "grid_priors", "detect"]

BOX_CODER = BoxCoder(weights=(10.0, 10.0, 5.0, 5.0))  # = mmdet DeltaXYWHBBoxCoder(target_stds=[.1, .1, .2, .2])


def _conv_gn_relu(c_in: int, c_out: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.GroupNorm(min(32, c_out // 4), c_out), nn.ReLU()]


class SmallBackbone(nn.Module):
    """A random-init CNN for CPU runs: C3, C4, C5 at strides 8, 16, 32 (widths 2w, 4w, 8w), GroupNorm."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.stem = nn.Sequential(*_conv_gn_relu(3, width, 2), *_conv_gn_relu(width, width, 2))  # stride 4
        self.stages = nn.ModuleList(
            nn.Sequential(*_conv_gn_relu(c_in, 2 * c_in, 2), *_conv_gn_relu(2 * c_in, 2 * c_in))
            for c_in in (width, 2 * width, 4 * width))
        self.out_channels = [2 * width, 4 * width, 8 * width]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x, outs = self.stem(x), []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return outs


class SmallFPNBackbone(nn.Module):
    """``SmallBackbone`` + torchvision FPN: P3-P5, and P6, P7 when ``num_levels=5``."""

    def __init__(self, width: int = 16, out_channels: int = 64, num_levels: int = 5):
        super().__init__()
        self.body = SmallBackbone(width)
        extra = LastLevelP6P7(out_channels, out_channels) if num_levels == 5 else None
        self.fpn = FeaturePyramidNetwork(self.body.out_channels, out_channels, extra_blocks=extra)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> OrderedDict:
        return self.fpn(OrderedDict((str(i), c) for i, c in enumerate(self.body(x))))


def grid_priors(sizes: list[tuple[int, int]], strides: tuple[int, ...], octave_base_scale: float,
                device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Anchors (N, 4) xyxy and their strides (N,), level by level, row-major, centred at (x*s, y*s)."""
    anchors, prior_strides = [], []
    for (h, w), s in zip(sizes, strides):
        ys, xs = torch.meshgrid(torch.arange(h, device=device) * s, torch.arange(w, device=device) * s,
                                indexing="ij")
        centres = torch.stack([xs, ys], -1).reshape(-1, 2).float()
        half = octave_base_scale * s / 2
        anchors.append(torch.cat([centres - half, centres + half], 1))
        prior_strides.append(torch.full((h * w,), float(s), device=device))
    return torch.cat(anchors), torch.cat(prior_strides)


def _flatten(x: torch.Tensor) -> torch.Tensor:
    """(B, K, H, W) -> (B, H*W, K)."""
    return x.flatten(2).transpose(1, 2)


class FAM3DHead(nn.Module):
    """FAM-3D (paper Sec. 3.3; official ``ssod/models/dense_heads/fam3d.py``, anchor-based mode).

    Classification and regression towers as in TOOD/ATSS (GroupNorm). From all tower outputs a small feature is
    made per level; concatenated with the neighbouring levels' (resized), it predicts (a) a per-coordinate scale
    weight in [-1, 1] that mixes the box map of this level with the finer (< 0) or coarser (> 0) level's, and
    (b) a spatial offset per box coordinate, at which the mixed box map is re-sampled bilinearly (a 1x1
    deformable convolution with unit weights, as the official ``deform_sampling``). Classification is not moved:
    each classification feature picks the best-aligned regression in its 3-D (scale x space) neighbourhood.
    The official per-level learnable ``Scale`` on the deltas is left out: a level without objects in a batch
    would leave it without gradient.
    """

    def __init__(self, in_channels: int, num_classes: int, feat_channels: int = 256, stacked_convs: int = 4,
                 offset_channel_shrink: int = 4):
        super().__init__()
        def tower():
            return nn.ModuleList(nn.Sequential(*_conv_gn_relu(in_channels if i == 0 else feat_channels, feat_channels))
                                 for i in range(stacked_convs))

        self.cls_convs, self.reg_convs = tower(), tower()
        self.cls_out = nn.Conv2d(feat_channels, num_classes, 3, padding=1)
        self.reg_out = nn.Conv2d(feat_channels, 4, 3, padding=1)
        mid = feat_channels // offset_channel_shrink
        self.pyramid_mapping = nn.Sequential(nn.Conv2d(feat_channels * stacked_convs * 2, mid, 1), nn.ReLU())
        self.reg_offset = nn.Conv2d(mid * 3, 4 * 2, 3, padding=1)
        self.pyramid_offset = nn.Conv2d(mid * 3, 4, 3, padding=1)
        for conv in [m for m in self.modules() if isinstance(m, nn.Conv2d)]:
            std = 0.001 if conv in (self.reg_offset, self.pyramid_offset, self.pyramid_mapping[0]) else 0.01
            nn.init.normal_(conv.weight, std=std)
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)
        nn.init.constant_(self.cls_out.bias, -4.59511985)  # prior probability 0.01

    def _towers(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Both towers; every intermediate output feeds the alignment features."""
        inter = []
        cls_feat = reg_feat = x
        for conv in self.cls_convs:
            cls_feat = conv(cls_feat)
            inter.append(cls_feat)
        for conv in self.reg_convs:
            reg_feat = conv(reg_feat)
            inter.append(reg_feat)
        return cls_feat, reg_feat, torch.cat(inter, 1)

    def forward(self, features: list[torch.Tensor], anchors: list[torch.Tensor],
                strides: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        scores, boxes, mapped = [], [], []
        for x, level_anchors, s in zip(features, anchors, strides):
            b, _, h, w = x.shape
            cls_feat, reg_feat, inter = self._towers(x)
            scores.append(self.cls_out(cls_feat).sigmoid())
            deltas = _flatten(self.reg_out(reg_feat)).reshape(-1, 4)
            decoded = BOX_CODER.decode_single(deltas, level_anchors.repeat(b, 1)) / s  # in units of the stride
            boxes.append(decoded.reshape(b, h, w, 4).permute(0, 3, 1, 2))
            mapped.append(self.pyramid_mapping(inter))
        aligned = [self.align(i, boxes, mapped, strides) for i in range(len(features))]
        return (torch.cat([_flatten(p) for p in scores], 1),
                torch.cat([_flatten(a * s) for a, s in zip(aligned, strides)], 1))

    def align(self, level: int, boxes: list[torch.Tensor], mapped: list[torch.Tensor],
              strides: tuple[int, ...]) -> torch.Tensor:
        """The FAM-3D box map of one level, in units of its stride."""
        size = boxes[level].shape[-2:]
        resize = partial(F.interpolate, size=size, mode="bilinear", align_corners=False)
        last = len(boxes) - 1
        lower = resize(mapped[level - 1]) if level > 0 else mapped[level]
        upper = resize(mapped[level + 1]) if level < last else mapped[level]
        offset_feat = torch.cat([lower, mapped[level], upper], 1)
        # scale weight: > 0 takes from the coarser level, < 0 from the finer one; none beyond the pyramid
        weight = self.pyramid_offset(offset_feat).clamp(min=0 if level == 0 else -1, max=0 if level == last else 1)
        box = boxes[level] * (1 - weight.abs())
        if level > 0:
            box = box + (-weight).clamp(min=0) * resize(boxes[level - 1]) * strides[level - 1] / strides[level]
        if level < last:
            box = box + weight.clamp(min=0) * resize(boxes[level + 1]) * strides[level + 1] / strides[level]
        return deform_sampling(box, self.reg_offset(offset_feat))


def deform_sampling(feature: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Bilinear re-sampling of each channel at its own (dy, dx) offset (channels 2c, 2c+1), zero outside."""
    channels = feature.shape[1]
    return deform_conv2d(feature, offset, feature.new_ones(channels, 1, 1, 1))


class PlainHead(nn.Module):
    """torchvision's RetinaNetHead (GroupNorm towers, one anchor), returning probabilities and decoded boxes."""

    def __init__(self, in_channels: int, num_classes: int, stacked_convs: int = 4):
        super().__init__()
        self.head = RetinaNetHead(in_channels, 1, num_classes, norm_layer=partial(nn.GroupNorm, 32))
        for tower in (self.head.classification_head.conv, self.head.regression_head.conv):
            del tower[stacked_convs:]

    def forward(self, features, anchors, strides):
        out = self.head(features)
        b = out["bbox_regression"].shape[0]
        all_anchors = torch.cat(anchors)
        boxes = BOX_CODER.decode_single(out["bbox_regression"].reshape(-1, 4), all_anchors.repeat(b, 1))
        return out["cls_logits"].sigmoid(), boxes.reshape(b, -1, 4)


class Detector(nn.Module):
    """RetinaNet-style one-stage detector with one anchor per location.

    Args:
        num_classes: object classes (no background class: sigmoid scores).
        backbone: ``small`` (random-init CNN + FPN, for CPU) or ``resnet50`` (torchvision ResNet-50-FPN).
        backbone_weights: torchvision weights name for ``resnet50`` (e.g. ``IMAGENET1K_V1``, downloads), or None.
        fam3d: the FAM-3D head (Consistent-Teacher) instead of the plain RetinaNet head.
        width: ``small`` backbone width; fpn_channels: FPN / head width; stacked_convs: convs per head tower.
        num_levels: 5 (P3-P7, strides 8-128) or 3 (P3-P5, ``small`` only).
        octave_base_scale: anchor side in strides (8 in the official config).
    """

    def __init__(self, num_classes: int, backbone: str = "resnet50",
                 backbone_weights: Literal["IMAGENET1K_V1", "IMAGENET1K_V2"] | None = None,
                 fam3d: bool = True, width: int = 16, fpn_channels: int = 256, stacked_convs: int = 4,
                 num_levels: int = 5, octave_base_scale: float = 8.0):
        super().__init__()
        if backbone == "resnet50":
            if num_levels != 5:
                raise ValueError("the resnet50 backbone has 5 levels (P3-P7)")
            self.backbone = resnet_fpn_backbone(backbone_name="resnet50", weights=backbone_weights,
                                                trainable_layers=3, returned_layers=[2, 3, 4],
                                                extra_blocks=LastLevelP6P7(fpn_channels, fpn_channels))
        elif backbone == "small":
            self.backbone = SmallFPNBackbone(width, fpn_channels, num_levels)
        else:
            raise ValueError(f"backbone must be 'small' or 'resnet50', got {backbone!r}")
        self.num_classes, self.fam3d, self.octave_base_scale = num_classes, fam3d, octave_base_scale
        self.strides = (8, 16, 32, 64, 128)[:num_levels]
        self.head = (FAM3DHead(fpn_channels, num_classes, fpn_channels, stacked_convs) if fam3d
                     else PlainHead(fpn_channels, num_classes, stacked_convs))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Scores (B, N, C) in [0, 1], boxes (B, N, 4) xyxy in pixels, anchors (N, 4), prior strides (N,)."""
        features = list(self.backbone(images).values())
        sizes = [tuple(f.shape[-2:]) for f in features]
        anchors, prior_strides = grid_priors(sizes, self.strides, self.octave_base_scale, images.device)
        per_level = list(anchors.split([h * w for h, w in sizes]))
        scores, boxes = self.head(features, per_level, self.strides)
        return scores, boxes, anchors, prior_strides


@torch.no_grad()
def detect(scores: torch.Tensor, boxes: torch.Tensor, prior_strides: torch.Tensor,
           image_sizes: list[tuple[int, int]], score_thr: float = 0.05, nms_pre: int = 1000,
           iou_thr: float = 0.6, max_per_img: int = 100, clip: bool = True) -> list[dict[str, torch.Tensor]]:
    """The official test_cfg: per level, the top ``nms_pre`` (prior, class) pairs above ``score_thr``; class-wise
    NMS at ``iou_thr``; at most ``max_per_img`` boxes, clipped to each image when ``clip`` (pseudo-boxes are
    clipped only once moved to the student's view, as in the official code)."""
    results = []
    levels = torch.unique_consecutive(prior_strides)
    for img_scores, img_boxes, (h, w) in zip(scores, boxes, image_sizes):
        kept_boxes, kept_scores, kept_labels = [], [], []
        for s in levels:
            in_level = (prior_strides == s).nonzero().squeeze(1)
            flat = img_scores[in_level].flatten()
            candidates = (flat > score_thr).nonzero().squeeze(1)
            top = flat[candidates].topk(min(nms_pre, len(candidates))).indices
            candidates = candidates[top]
            num_classes = img_scores.shape[1]
            kept_boxes.append(img_boxes[in_level[candidates // num_classes]])
            kept_scores.append(flat[candidates])
            kept_labels.append(candidates % num_classes)
        b, sc, lb = torch.cat(kept_boxes), torch.cat(kept_scores), torch.cat(kept_labels)
        if clip:
            b = torch.stack([b[:, 0].clamp(0, w), b[:, 1].clamp(0, h), b[:, 2].clamp(0, w), b[:, 3].clamp(0, h)], 1)
        keep = batched_nms(b, sc, lb, iou_thr)[:max_per_img]
        results.append({"boxes": b[keep], "scores": sc[keep], "labels": lb[keep]})
    return results
