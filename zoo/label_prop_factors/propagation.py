"""Training-free video label propagation with every implementation factor exposed.

For target frame t, with L2-normalised features f (C channels, h x w positions per frame):

    context(t) = [0] + [max(t - n + i, 0) for i in 0..n-1]       (first frame + the previous n frames,
                                                                    padded with frame 0 near the start)
    A[q, k]    = <f_t[q], f_c[k]> / tau   over all context positions k (one matmul batched over the context)
    A[q, k]   -= inf  where |pos(q) - pos(k)| >= radius (the n recent frames only; the first frame is global)
    W          = softmax over the top-k entries of A[q, :] (the rest get 0)
    y_t[q]     = sum_k W[q, k] y_c[k]                             (soft labels; y_0 = the given mask)

The first frame's one-hot mask is bilinearly downsampled to h x w, predictions stay soft while they serve as
context, and each is bilinearly upsampled to the image size and argmaxed for evaluation. Defaults are CRW's
(``ajabri/videowalk`` ``code/utils/arguments.py`` test args and ``code/test.py``): tau 0.07, k 10, radius 12,
n 20, first frame kept, L2 normalisation on, stride-8 ResNet ``layer3`` features.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["LabelPropagation", "DenseFeatures", "context_frames", "radius_mask", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def context_frames(t: int, context: int, keep_first: bool = True) -> list[int]:
    """The frames target ``t`` reads labels from: frame 0 (when ``keep_first``) then the ``context`` previous frames,
    frame 0 repeated where t < context (CRW pads the video with copies of the first frame)."""
    recent = [max(t - context + i, 0) for i in range(context)]
    return ([0] if keep_first else []) + recent


def radius_mask(height: int, width: int, radius: float) -> torch.Tensor:
    """(h*w, h*w) boolean: query position q may read key position k when their Euclidean distance in feature
    pixels is strictly below ``radius`` (CRW's ``MaskedAttention``); ``inf`` allows everything."""
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    pos = torch.stack([ys.flatten(), xs.flatten()], dim=1).float()
    return torch.cdist(pos, pos) < radius


class LabelPropagation(nn.Module):
    """Propagate the first frame's label map through a video by feature affinities (no parameters).

    Args:
        temperature: softmax temperature tau of the affinities (CRW 0.07).
        topk: neighbours kept per target position (CRW 10).
        radius: spatial radius in feature pixels for the recent context frames (CRW 12; ``math.inf``: none).
        context: number n of previous frames in the context (CRW ``--videoLen`` 20).
        keep_first: always include the annotated first frame, unrestricted by the radius (CRW ``--long-mem 0``).
        restrict_first: also apply the radius to the first frame (off in CRW).
        l2_normalize: L2-normalise features over channels before the dot products (CRW on; ``--no-l2`` off).
        normalize_labels: min-max rescale each propagated label vector over classes (CRW ``--norm_mask``, off).
    """

    def __init__(self, temperature: float = 0.07, topk: int = 10, radius: float = 12.0, context: int = 20,
                 keep_first: bool = True, restrict_first: bool = False, l2_normalize: bool = True,
                 normalize_labels: bool = False):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        if radius <= 0:
            raise ValueError(f"radius must be > 0 (math.inf for no restriction), got {radius}")
        if context < 0 or (context == 0 and not keep_first):
            raise ValueError(f"context must be >= 0 and the context non-empty (context={context}, "
                             f"keep_first={keep_first})")
        self.temperature, self.topk, self.radius, self.context = temperature, topk, radius, context
        self.keep_first, self.restrict_first = keep_first, restrict_first
        self.l2_normalize, self.normalize_labels = l2_normalize, normalize_labels

    def weights(self, query: torch.Tensor, keys: torch.Tensor, allowed: torch.Tensor) -> tuple[torch.Tensor,
                                                                                                 torch.Tensor]:
        """Top-k softmax weights and key indices: query (C, Q), keys (F, C, K), allowed (F, Q, K) boolean ->
        (Q, k) weights summing to 1 and (Q, k) indices into the flattened F*K context positions."""
        affinity = torch.einsum("cq,fck->qfk", query, keys).float() / self.temperature  # float32 softmax
        affinity = affinity.masked_fill(~allowed.transpose(0, 1), float("-inf")).flatten(1)
        k = min(self.topk, affinity.shape[1])
        top, index = affinity.topk(k, dim=1)
        return torch.softmax(top, dim=1), index

    @torch.no_grad()
    def forward(self, features: torch.Tensor, first_label: torch.Tensor) -> torch.Tensor:
        """features (T, C, h, w) of every frame, first_label (K, h, w) soft/one-hot labels of frame 0 at feature
        resolution -> (T, K, h, w) soft labels, frame 0 the given one."""
        num_frames, _, height, width = features.shape
        if first_label.shape[-2:] != (height, width):
            raise ValueError(f"first_label is {tuple(first_label.shape[-2:])}, features are {(height, width)}")
        if self.l2_normalize:
            features = F.normalize(features, dim=1)
        flat = features.flatten(2)                                     # (T, C, hw)
        local = radius_mask(height, width, self.radius).to(features.device)
        labels = [first_label.flatten(1).float()]                      # (K, hw) per frame
        for t in range(1, num_frames):
            frames = context_frames(t, self.context, self.keep_first)
            allowed = local.expand(len(frames), -1, -1).clone()
            if self.keep_first and not self.restrict_first:
                allowed[0] = True
            weights, index = self.weights(flat[t], flat[frames], allowed)
            context_labels = torch.cat([labels[f] for f in frames], dim=1)   # (K, F*hw)
            predicted = (context_labels[:, index] * weights).sum(-1)         # (K, hw)
            if self.normalize_labels:
                low, high = predicted.min(0, keepdim=True).values, predicted.max(0, keepdim=True).values
                predicted = (predicted - low) / (high - low).clamp_min(1e-12)
            labels.append(predicted)
        return torch.stack(labels).view(num_frames, -1, height, width)


class DenseFeatures(nn.Module):
    """Dense feature maps of a timm ResNet: the stem and stages up to ``layer``, strides of ``layer3``/``layer4``
    set to 1 while the total stride exceeds ``stride`` (CRW's ``ResNet.modify``: layer3 at stride 8).

    Args:
        encoder: a timm ResNet (e.g. ``zoo.ssl.encoders.timm_encoder("resnet18")``), copied, not modified.
        layer: the last stage used, ``layer1``..``layer4`` (CRW ``layer3``: ``--remove-layers layer4``).
        stride: the output stride, 4 / 8 / 16 / 32 reachable by removing strides (CRW 8).
    """

    def __init__(self, encoder: nn.Module, layer: str = "layer3", stride: int = 8):
        super().__init__()
        stages = ["layer1", "layer2", "layer3", "layer4"]
        if layer not in stages or not all(hasattr(encoder, s) for s in stages):
            raise ValueError(f"layer must be one of {stages} of a timm ResNet, got {layer!r}")
        natural = {"layer1": 4, "layer2": 8, "layer3": 16, "layer4": 32}[layer]
        lowest = min(natural, 8)  # layer1/layer2 keep their strides
        if stride not in (4, 8, 16, 32) or not lowest <= stride <= natural:
            raise ValueError(f"stride {stride} is not reachable at {layer} (natural stride {natural}; "
                             f"only layer3/layer4 strides can be removed)")
        encoder = copy.deepcopy(encoder)
        excess = int(math.log2(natural // stride))
        for name in reversed(stages[2:stages.index(layer) + 1]):   # remove the deepest strides first
            if excess == 0:
                break
            for module in getattr(encoder, name).modules():
                if isinstance(module, nn.Conv2d) and module.stride != (1, 1):
                    module.stride = (1, 1)
            excess -= 1
        self.stem = nn.Sequential(encoder.conv1, encoder.bn1, encoder.act1, encoder.maxpool)
        self.stages = nn.Sequential(*[getattr(encoder, s) for s in stages[:stages.index(layer) + 1]])
        self.stride = stride
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @torch.no_grad()
    def forward(self, frames: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
        """frames (T, 3, H, W) in [0, 1] -> (T, C, ceil(H/stride), ceil(W/stride)), in eval mode, in batches."""
        self.eval()
        out = [self.stages(self.stem((chunk - self.mean) / self.std)) for chunk in frames.split(batch_size)]
        return torch.cat(out)
