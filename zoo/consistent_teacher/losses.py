"""Assignment, detection loss and pseudo-box rules of Consistent-Teacher, as pure functions (parity-tested).

- ``dynamic_assign``: adaptive sample assignment (ASA), the official ``DynamicSoftLabelAssigner``: candidates are
  priors whose centre lies strictly inside some box; cost = focal-weighted BCE on probabilities summed over
  classes + ``iou_factor * -log(IoU + 1e-7)`` + ``0.001 * 10 ** (centre distance / stride)``; each box takes its
  ``max(1, int(sum of its top-13 IoUs))`` cheapest candidates; a prior claimed twice keeps its cheapest box.
- ``static_assign``: RetinaNet's max-IoU rule (positive >= 0.5, negative < 0.4, each box's best anchors positive),
  torchvision's ``Matcher``; the plain mean-teacher baseline.
- ``detection_loss``: sigmoid focal loss on probabilities (alpha 0.25, gamma 2) over all non-ignored priors and
  GIoU (weight 2) on positives. With ASA, box terms are weighted by the matched IoU and both terms are divided by
  the sum of those IoUs (official FAM3DHead.loss); with static assignment, by the number of positives. The
  normaliser is averaged over processes (mmdet ``reduce_mean``) and clamped at 1.
- ``select_by_score_sum`` and ``gmm_threshold``: the teacher's pseudo-boxes (official ``extract_teacher_info``
  and ``gmm_policy``).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.mixture import GaussianMixture
from torchvision.models.detection._utils import Matcher
from torchvision.ops import box_iou, generalized_box_iou_loss

from zoo.core.distributed import mean_over_ranks

__all__ = ["focal_loss_with_prob", "dynamic_assign", "static_assign", "detection_loss", "select_by_score_sum",
           "gmm_threshold", "push_scores", "transform_boxes_torch"]


def focal_loss_with_prob(probs: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25,
                         gamma: float = 2.0) -> torch.Tensor:
    """Element-wise sigmoid focal loss on probabilities (mmdet ``FocalLoss(activated=True)``)."""
    pt = (1 - probs) * targets + probs * (1 - targets)
    weight = (alpha * targets + (1 - alpha) * (1 - targets)) * pt.pow(gamma)
    return F.binary_cross_entropy(probs, targets, reduction="none") * weight


@torch.no_grad()
def dynamic_assign(scores: torch.Tensor, boxes: torch.Tensor, anchors: torch.Tensor, strides: torch.Tensor,
                   gt_boxes: torch.Tensor, gt_labels: torch.Tensor, topk: int = 13,
                   iou_factor: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    """ASA for one image. Returns the matched box per prior (-1: background) and the IoU of the prior's predicted
    box with it (0 for background). ``scores`` (N, C) are probabilities, ``boxes`` (N, 4) predicted xyxy."""
    num_priors, num_gt = boxes.shape[0], gt_boxes.shape[0]
    assigned = torch.full((num_priors,), -1, dtype=torch.long, device=boxes.device)
    assigned_iou = boxes.new_zeros(num_priors)
    if num_gt == 0:
        return assigned, assigned_iou
    centres = (anchors[:, :2] + anchors[:, 2:]) / 2
    inside = torch.cat([centres[:, None] - gt_boxes[:, :2], gt_boxes[:, 2:] - centres[:, None]], -1).amin(-1) > 0
    valid = inside.any(1).nonzero().squeeze(1)
    if len(valid) == 0:
        return assigned, assigned_iou
    ious = box_iou(boxes[valid], gt_boxes)                                        # (V, G)
    gt_centres = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2
    distance = (centres[valid, None] - gt_centres[None]).pow(2).sum(-1).sqrt() / strides[valid, None]
    onehot = F.one_hot(gt_labels.long(), scores.shape[1]).float()[None].expand(len(valid), -1, -1)
    cls_cost = focal_loss_with_prob(scores[valid, None].expand(-1, num_gt, -1), onehot).sum(-1)
    cost = cls_cost + iou_factor * -torch.log(ious + 1e-7) + 0.001 * torch.pow(10, distance)

    dynamic_k = ious.topk(min(topk, len(valid)), dim=0).values.sum(0).int().clamp(min=1)
    matching = torch.zeros_like(cost)
    for g in range(num_gt):
        matching[cost[:, g].topk(int(dynamic_k[g]), largest=False).indices, g] = 1.0
    claimed_twice = matching.sum(1) > 1
    if claimed_twice.any():
        matching[claimed_twice] = 0.0
        matching[claimed_twice, cost[claimed_twice].argmin(1)] = 1.0
    positive = matching.sum(1) > 0
    matched_gt = matching[positive].argmax(1)
    assigned[valid[positive]] = matched_gt
    assigned_iou[valid[positive]] = ious[positive, matched_gt]
    return assigned, assigned_iou


_MATCHER = Matcher(0.5, 0.4, allow_low_quality_matches=True)


@torch.no_grad()
def static_assign(anchors: torch.Tensor, gt_boxes: torch.Tensor) -> torch.Tensor:
    """Max-IoU assignment of anchors: matched box index, -1 background, -2 ignored (IoU in [0.4, 0.5))."""
    if gt_boxes.shape[0] == 0:
        return torch.full((anchors.shape[0],), -1, dtype=torch.long, device=anchors.device)
    return _MATCHER(box_iou(gt_boxes, anchors))


def detection_loss(scores: torch.Tensor, boxes: torch.Tensor, anchors: torch.Tensor, strides: torch.Tensor,
                   gt_boxes: list[torch.Tensor], gt_labels: list[torch.Tensor], adaptive_assignment: bool = True,
                   topk: int = 13, iou_factor: float = 2.0, box_loss_weight: float = 2.0) -> dict[str, torch.Tensor]:
    """Classification and box losses of a batch: ``scores`` (B, N, C), ``boxes`` (B, N, 4), targets per image."""
    cls_total, box_total = scores.new_zeros(()), boxes.new_zeros(())
    normaliser = scores.new_zeros(())
    for img_scores, img_boxes, img_gt, img_labels in zip(scores, boxes, gt_boxes, gt_labels):
        if adaptive_assignment:
            assigned, box_weight = dynamic_assign(img_scores.detach(), img_boxes.detach(), anchors, strides,
                                                  img_gt, img_labels, topk, iou_factor)
        else:
            assigned = static_assign(anchors, img_gt)
        positive = assigned >= 0
        if not adaptive_assignment:
            box_weight = positive.float()
        targets = torch.zeros_like(img_scores)
        targets[positive, img_labels[assigned[positive]].long()] = 1.0
        counted = (assigned != -2).float()                  # static assignment ignores IoU in [0.4, 0.5)
        cls_total = cls_total + (focal_loss_with_prob(img_scores, targets).sum(1) * counted).sum()
        if positive.any():
            giou = generalized_box_iou_loss(img_boxes[positive], img_gt[assigned[positive]], reduction="none")
            box_total = box_total + (giou * box_weight[positive]).sum()
        else:
            box_total = box_total + img_boxes.sum() * 0
        normaliser = normaliser + box_weight[positive].sum()
    normaliser = mean_over_ranks(normaliser.detach()).clamp(min=1)
    return {"cls": cls_total / normaliser, "box": box_loss_weight * box_total / normaliser}


def select_by_score_sum(scores: torch.Tensor, dynamic_ratio: float = 1.0) -> torch.Tensor:
    """The first, loose filter on one image's teacher boxes: keep the ``n + 1`` best, n = int(sum * ratio + 0.5)
    capped at len - 1 (as the official code: threshold = the n-th best score minus 1e-5, kept if strictly above)."""
    if len(scores) == 0:
        return torch.zeros(0, dtype=torch.bool, device=scores.device)
    ordered = scores.sort(descending=True).values
    n = min(int(float(ordered.sum()) * dynamic_ratio + 0.5), len(ordered) - 1)
    return scores > ordered[n] - 1e-5


def gmm_threshold(scores: np.ndarray, default: float = 0.0, policy: str = "high") -> float:
    """Per-class threshold from a two-component 1-D GMM on recent scores (official ``gmm_policy``).

    Means start at the min and max score, weights at 1/2, precisions at 1: the fit is deterministic. ``high``:
    among positive-component (index 1) scores, those at or above the one the GMM finds most likely, the lowest of
    them; ``middle``: the lowest positive-component score. Fewer than 4 scores or no positive point: ``default``.
    """
    scores = np.asarray(scores).reshape(-1, 1)  # dtype kept, as the official fit of the float32 queue
    if len(scores) < 4:
        return default
    gmm = GaussianMixture(2, weights_init=[0.5, 0.5], means_init=[[scores.min()], [scores.max()]],
                          precisions_init=[[[1.0]], [[1.0]]])
    gmm.fit(scores)
    assignment, likelihood = gmm.predict(scores), gmm.score_samples(scores)
    if not (assignment == 1).any():
        return default
    if policy == "middle":
        return float(scores[assignment == 1].min())
    if policy != "high":
        raise ValueError(f"policy must be 'high' or 'middle', got {policy!r}")
    likelihood[assignment == 0] = -np.inf
    best = scores[np.argmax(likelihood)]
    return float(scores[(assignment == 1) & (scores >= best).squeeze(1)].min())


def push_scores(queue: torch.Tensor, new_scores: torch.Tensor) -> torch.Tensor:
    """A class's FIFO of recent scores, newest first, fixed length (official ``self.scores[label]`` update)."""
    return torch.cat([new_scores.float(), queue.float()])[: len(queue)]


def transform_boxes_torch(boxes: torch.Tensor, matrix: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """xyxy boxes through a 3x3 affine matrix: enclosing box of the mapped corners, clipped to the image."""
    if len(boxes) == 0:
        return boxes
    x0, y0, x1, y1 = boxes.unbind(1)
    corners = torch.stack([torch.stack(c, -1) for c in ((x0, y0), (x1, y0), (x0, y1), (x1, y1))], 1)
    mapped = corners @ matrix[:2, :2].T + matrix[:2, 2]
    out = torch.cat([mapped.amin(1), mapped.amax(1)], 1)
    return torch.stack([out[:, 0].clamp(0, width), out[:, 1].clamp(0, height),
                        out[:, 2].clamp(0, width), out[:, 3].clamp(0, height)], 1)
