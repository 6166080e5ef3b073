"""Consistent-Teacher: Towards Reducing Inconsistent Pseudo-targets in Semi-supervised Object Detection
(Wang et al., CVPR 2023).

A mean teacher for a one-stage (RetinaNet-style) detector. The EMA teacher (momentum 0.9995) detects objects on
the weak view of an unlabeled image; its boxes, moved onto the strong view through the two views' affine matrices,
train the student there:

    loss = sup(labeled) + unsup_weight * [step >= warm-up] * bg * unsup(strong view, teacher's pseudo-boxes)

with ``bg = 0.01`` when fewer than half of the unlabeled images keep any pseudo-box. The paper's three parts,
each a switch, remove the inconsistencies of the plain mean teacher:

- ``adaptive_assignment`` (ASA): the student's positives are chosen by a matching cost (classification + IoU +
  centre prior, top-13 dynamic k; ``losses.dynamic_assign``) instead of fixed anchor-IoU thresholds, so noisy
  pseudo-boxes do not flip anchors between positive and negative;
- ``network.fam3d`` (FAM-3D): each classification feature picks its regression from a neighbourhood in scale
  and space (``detector.FAM3DHead``);
- ``gmm_threshold``: per class, a two-component GMM fitted to the last 100 teacher scores gives the threshold
  (after a loose top-``sum(scores)`` filter) instead of a fixed one (``score_threshold``, 0.5 in the official
  mean-teacher baseline).

All three off is the plain mean-teacher baseline; ``uratio: 0`` in the data module trains on labeled images only.

Follows the official code (Adamdad/ConsistentTeacher, ``ssod/models/consistent_teacher.py``, ``fam3d.py``,
``dynamic_assigner.py``, the COCO 10% config) where it is more specific than the paper: focal loss on
probabilities, GIoU weight 2, ASA's iou_factor 2.0 and box weights = matched IoU, the ``n + 1`` boxes kept by the
loose filter, strict ``>`` thresholds, per-process score queues (not gathered, as there), the teacher's momentum
warm-up ``min(m, 1 - 1/(k+1))`` of its MeanTeacher hook, SGD 0.01 with gradient clipping 20. Departures: the
teacher and the strong view are skipped while the unsupervised weight is 0 (the official code runs them and
multiplies by 0), and FAM-3D drops the per-level learnable ``Scale`` (see ``detector.FAM3DHead``).
"""
from __future__ import annotations

import torch
from torchvision.ops import box_iou

from zoo.core.media import wandb_loggers
from zoo.core.metrics import mean_average_precision
from zoo.core.module import ZooModule

from .data import IMAGENET_MEAN, IMAGENET_STD
from .detector import Detector, detect
from .losses import detection_loss, gmm_threshold, push_scores, select_by_score_sum, transform_boxes_torch

__all__ = ["ConsistentTeacher", "map_metrics", "pad_to"]

MAP_KEYS = {"map": "mAP", "map_50": "mAP50", "map_75": "mAP75", "map_small": "mAP_small",
            "map_medium": "mAP_medium", "map_large": "mAP_large"}


def map_metrics(metric) -> dict[str, float]:
    """COCO mAP, mAP50, mAP75 and per-size mAP from ``zoo.core.metrics.mean_average_precision``, renamed."""
    values = metric.compute()
    return {name: float(values[key]) for key, name in MAP_KEYS.items()}


def pad_to(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Pad bottom-right with the normalised value of a black pixel, as the padding in the data pipeline."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    black = -mean / std
    out = black.expand(images.shape[0], 3, height, width).clone()
    out[:, :, :images.shape[2], :images.shape[3]] = images
    return out


class ConsistentTeacher(ZooModule):
    """Consistent-Teacher; defaults are the official COCO 10% config.

    Args:
        network: ``detector.Detector`` (its ``fam3d`` switches FAM-3D).
        adaptive_assignment: ASA (dynamic cost-based assignment) instead of max-IoU anchor assignment.
        topk, iou_factor: ASA's candidate count for dynamic k (13) and IoU-cost factor (2.0).
        gmm_threshold: per-class GMM thresholds instead of the fixed ``score_threshold``.
        dynamic_ratio, num_scores, gmm_policy: loose filter ratio (1.0), score-queue length (100), ``high``.
        score_threshold: the fixed pseudo-box threshold of the baseline (0.5).
        unsup_weight: weight of the unsupervised loss (2.0); unsup_warmup_steps: it is 0 before this step (10k).
        background_weight: unsupervised loss factor when under half of the images keep a pseudo-box (0.01).
        box_loss_weight: GIoU loss weight (2.0).
        panel_every_n_steps: W&B panel of pseudo-boxes on the strong view every this many steps (0: never).
        The optimisation arguments are the base's, with the official SGD values as defaults.
    """

    expected_metrics = ("val/mAP", "val/mAP50", "val/mAP75")

    def __init__(self, network: Detector, adaptive_assignment: bool = True, topk: int = 13, iou_factor: float = 2.0,
                 gmm_threshold: bool = True, dynamic_ratio: float = 1.0, num_scores: int = 100,
                 gmm_policy: str = "high", score_threshold: float = 0.5, unsup_weight: float = 2.0,
                 unsup_warmup_steps: int = 10000, background_weight: float = 0.01, box_loss_weight: float = 2.0,
                 panel_every_n_steps: int = 500, lr: float = 0.01, weight_decay: float = 1e-4, nesterov: bool = False,
                 warmup_steps: int = 500, cosine_cycles: float = 0.0, ema_decay: float | None = 0.9995, **base):
        super().__init__(network, lr=lr, weight_decay=weight_decay, nesterov=nesterov, warmup_steps=warmup_steps,
                         cosine_cycles=cosine_cycles, ema_decay=ema_decay, **base)
        self.adaptive_assignment, self.topk, self.iou_factor = adaptive_assignment, topk, iou_factor
        self.use_gmm, self.dynamic_ratio, self.gmm_policy = gmm_threshold, dynamic_ratio, gmm_policy
        self.score_threshold, self.unsup_weight = score_threshold, unsup_weight
        self.unsup_warmup_steps = unsup_warmup_steps
        self.background_weight, self.box_loss_weight = background_weight, box_loss_weight
        self.panel_every_n_steps = panel_every_n_steps
        self.register_buffer("score_queue", torch.zeros(network.num_classes, num_scores))
        self.val_map, self.val_student_map = mean_average_precision(), mean_average_precision()

    @property
    def teacher(self) -> Detector:
        return self.ema.module if self.ema is not None else self.network

    def ema_decay_at(self, step: int) -> float:
        """The official MeanTeacher hook: momentum ``min(m, 1 - 1/(k+1))`` at its iteration k = step + 1."""
        return min(self.ema_decay, (step + 1) / (step + 2))

    def _loss(self, scores, boxes, anchors, strides, gt_boxes, gt_labels) -> dict[str, torch.Tensor]:
        return detection_loss(scores, boxes, anchors, strides, gt_boxes, gt_labels, self.adaptive_assignment,
                              self.topk, self.iou_factor, self.box_loss_weight)

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        lb, ulb = batch["lb"], batch.get("ulb")
        use_unlabeled = ulb is not None and self.unsup_weight > 0 and self.global_step >= self.unsup_warmup_steps
        views = [lb["image"]] + ([ulb["strong"]] if use_unlabeled else [])
        height, width = max(v.shape[2] for v in views), max(v.shape[3] for v in views)
        # one student forward for both streams: GroupNorm heads make it equal to two separate ones
        scores, boxes, anchors, strides = self.network(torch.cat([pad_to(v, height, width) for v in views]))
        num_lb = lb["image"].shape[0]
        sup = self._loss(scores[:num_lb], boxes[:num_lb], anchors, strides, lb["boxes"], lb["labels"])
        loss = sup["cls"] + sup["box"]
        logs = {"train/sup_cls_loss": sup["cls"], "train/sup_box_loss": sup["box"]}
        if use_unlabeled:
            pseudo_boxes, pseudo_labels, stats = self.pseudo_boxes(ulb)
            unsup = self._loss(scores[num_lb:], boxes[num_lb:], anchors, strides, pseudo_boxes, pseudo_labels)
            with_boxes = sum(len(b) > 0 for b in pseudo_boxes)
            factor = self.background_weight if with_boxes < len(pseudo_boxes) / 2 else 1.0
            loss = loss + self.unsup_weight * factor * (unsup["cls"] + unsup["box"])
            logs.update({"train/unsup_cls_loss": unsup["cls"], "train/unsup_box_loss": unsup["box"], **stats})
            if self.panel_every_n_steps and self.global_step % self.panel_every_n_steps == 0:
                self._log_boxes("train/pseudo_boxes", ulb["strong"], pseudo_boxes, pseudo_labels)
        logs["train/loss"] = loss
        self.log_dict(logs, prog_bar=False)
        return loss

    @torch.no_grad()
    def pseudo_boxes(self, ulb: dict) -> tuple[list[torch.Tensor], list[torch.Tensor], dict[str, float]]:
        """Teacher detections on the weak view, thresholded, mapped onto the strong view."""
        scores, boxes, _, strides = self.teacher(ulb["weak"])
        detections = detect(scores, boxes, strides, ulb["weak_size"].tolist(), clip=False)
        if self.use_gmm:
            detections = [{k: v[select_by_score_sum(d["scores"], self.dynamic_ratio)] for k, v in d.items()}
                          for d in detections]
            thresholds = self._class_thresholds(torch.cat([d["scores"] for d in detections]),
                                                torch.cat([d["labels"] for d in detections]))
        else:
            thresholds = torch.full((self.score_queue.shape[0],), self.score_threshold, device=scores.device)
        kept_boxes, kept_labels = [], []
        for d, weak_m, strong_m, (h, w) in zip(detections, ulb["weak_matrix"], ulb["strong_matrix"],
                                               ulb["strong_size"].tolist()):
            keep = d["scores"] > thresholds[d["labels"]]
            moved = transform_boxes_torch(d["boxes"][keep], strong_m @ torch.linalg.inv(weak_m), h, w)
            valid = (moved[:, 2] > moved[:, 0]) & (moved[:, 3] > moved[:, 1])
            kept_boxes.append(moved[valid])
            kept_labels.append(d["labels"][keep][valid])
        return kept_boxes, kept_labels, self._pseudo_stats(kept_boxes, kept_labels, ulb, thresholds)

    def _class_thresholds(self, scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Push this batch's scores into each present class's queue, and refit that class's GMM threshold."""
        thresholds = torch.zeros(self.score_queue.shape[0], device=scores.device)
        for c in labels.unique().tolist():
            self.score_queue[c] = push_scores(self.score_queue[c], scores[labels == c])
            recent = self.score_queue[c][self.score_queue[c] > 0]
            thresholds[c] = gmm_threshold(recent.cpu().numpy(), default=0.0, policy=self.gmm_policy)
        return thresholds

    def _pseudo_stats(self, boxes, labels, ulb, thresholds) -> dict[str, float]:
        """Diagnostics against the unlabeled images' true boxes (never used for training)."""
        hits = found = num_pseudo = num_true = 0
        for b, lab, tb, tl in zip(boxes, labels, ulb["boxes"], ulb["labels"]):
            num_pseudo, num_true = num_pseudo + len(b), num_true + len(tb)
            if len(b) and len(tb):
                match = (box_iou(b, tb) >= 0.5) & (lab[:, None] == tl[None])
                hits, found = hits + int(match.any(1).sum()), found + int(match.any(0).sum())
        return {"train/pseudo_boxes_per_image": num_pseudo / max(1, len(boxes)),
                "train/pseudo_precision": hits / max(1, num_pseudo), "train/pseudo_recall": found / max(1, num_true),
                "train/mean_threshold": float(thresholds.mean())}

    # ---------------------------------------------------------------- evaluation
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        targets = [{"boxes": b, "labels": lab, "area": a, "iscrowd": c}
                   for b, lab, a, c in zip(batch["boxes"], batch["labels"], batch["area"], batch["iscrowd"])]
        for model, metric in ((self.teacher, self.val_map), (self.network, self.val_student_map)):
            scores, boxes, _, strides = model(batch["image"])
            detections = detect(scores, boxes, strides, batch["image_size"].tolist())
            if batch_idx == 0 and model is self.teacher:
                self._log_boxes("val/predictions", batch["image"], [d["boxes"] for d in detections],
                                [d["labels"] for d in detections], [d["scores"] for d in detections])
            for d, scale in zip(detections, batch["scale"].tolist()):
                d["boxes"] = d["boxes"] / scale      # back to original pixels: COCO size ranges apply there
            metric.update(detections, targets)

    def on_validation_epoch_end(self) -> None:
        for prefix, metric in (("val/", self.val_map), ("val/student_", self.val_student_map)):
            self.log_dict({prefix + k: v for k, v in map_metrics(metric).items()}, sync_dist=False)
            metric.reset()

    # ---------------------------------------------------------------- W&B panels
    def _log_boxes(self, key: str, images: torch.Tensor, boxes, labels, scores=None, num_images: int = 4) -> None:
        """Boxes drawn on images in W&B (only when the logger is a WandbLogger, on rank 0)."""
        loggers = wandb_loggers(self.trainer)
        if not loggers:
            return
        import wandb

        mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=images.device).view(3, 1, 1)
        classes = getattr(self.trainer.datamodule, "classes", None) or tuple(map(str, range(self.score_queue.shape[0])))
        panels = []
        for i in range(min(num_images, len(images))):
            pixels = (images[i] * std + mean).clamp(0, 255).byte().permute(1, 2, 0).cpu().numpy()
            data = [{"position": {"minX": x0, "minY": y0, "maxX": x1, "maxY": y1}, "domain": "pixel",
                     "class_id": int(c), "box_caption": classes[int(c)],
                     **({"scores": {"score": float(scores[i][j])}} if scores is not None else {})}
                    for j, ((x0, y0, x1, y1), c) in enumerate(zip(boxes[i].tolist(), labels[i].tolist()))]
            panels.append(wandb.Image(pixels, boxes={"boxes": {"box_data": data,
                                                               "class_labels": dict(enumerate(classes))}}))
        for lg in loggers:
            lg.experiment.log({key: panels, "trainer/global_step": self.global_step})
