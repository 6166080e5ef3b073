"""Sub-Pseudo Labels (SPL; Li, Zhang, Wu, Xiong, Lee, Lu, Fu & Pfister, AAAI 2022, arXiv 2101.03713).

No official code was released; this follows the paper's text. Three stages, one run (fractions of ``max_steps``):

1. teacher: a network trained with cross-entropy on the small clean target set;
2. pre-training: the teacher labels every weakly labelled web clip once (``t`` = its argmax); the student learns,
   with cross-entropy, the clip's sub-pseudo label in an extrapolated label space indexed by the pair
   (weak query label ``w``, teacher prediction ``t``): ``t == w`` keeps the class ``w``; every other pair
   ``(w, t)`` is a new "sub-concept" class (``w`` queried, ``t`` seen). Of the ``N (N - 1)`` off-diagonal pairs the
   ``num_sub_concepts`` most frequent are kept (all with ``None``); a pruned pair falls back to its query ``w``;
3. fine-tuning: the pre-trained student with a new N-way head on the clean target set; evaluated on the test split.

The baselines are switches of the same module (same student, data and steps): ``label_rule="pseudo"`` pre-trains
on the teacher's argmax (plain pseudo-labels), ``label_rule="weak"`` on the query labels as they are. The teacher
alone is logged by every run as ``val/teacher_acc``.
"""
from __future__ import annotations

import copy
import math
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from zoo.core.metrics import accuracy
from zoo.core.module import ZooModule

__all__ = ["SPL", "build_label_space", "class_pairs", "pair_counts", "sub_pseudo_labels"]


def pair_counts(weak: torch.Tensor, teacher: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``counts[w, t]``: web clips queried as ``w`` that the teacher predicts as ``t``."""
    return torch.bincount(weak * num_classes + teacher, minlength=num_classes ** 2).view(num_classes, num_classes)


def build_label_space(counts: torch.Tensor, num_sub_concepts: int | None) -> torch.Tensor:
    """``pair_to_class[w, t]``, the SPL class of the pair: ``w`` on the diagonal; the kept off-diagonal pairs get
    ``N, N+1, ...`` in order of decreasing frequency (ties: row-major order); pruned pairs map to ``w``. Pairs
    never seen are pruned too, so the space has ``N + min(num_sub_concepts, #seen pairs)`` used classes."""
    n = counts.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=counts.device)
    pair_to_class = torch.arange(n, device=counts.device)[:, None].expand(n, n).clone()   # every pair -> its query w
    off_diagonal = counts.masked_fill(eye, -1).flatten()
    order = torch.sort(off_diagonal, descending=True, stable=True).indices
    limit = n * (n - 1) if num_sub_concepts is None else num_sub_concepts
    kept = order[:limit][off_diagonal[order[:limit]] > 0]
    pair_to_class.view(-1)[kept] = n + torch.arange(len(kept), device=counts.device)
    return pair_to_class


def sub_pseudo_labels(weak: torch.Tensor, teacher: torch.Tensor, pair_to_class: torch.Tensor) -> torch.Tensor:
    """The SPL of each clip: ``pair_to_class[w, t]``."""
    return pair_to_class[weak, teacher]


def class_pairs(pair_to_class: torch.Tensor, num_spl_classes: int) -> torch.Tensor:
    """``(num_spl_classes, 2)``: the (w, t) pair each SPL class stands for (``(c, c)`` for the original classes,
    ``(-1, -1)`` for unused slots); column 1 maps an SPL prediction back to the target class seen."""
    n = pair_to_class.shape[0]
    pairs = torch.full((num_spl_classes, 2), -1, dtype=torch.long, device=pair_to_class.device)
    pairs[:n] = torch.arange(n, device=pair_to_class.device)[:, None]
    w, t = torch.nonzero(pair_to_class >= n, as_tuple=True)
    pairs[pair_to_class[w, t]] = torch.stack([w, t], 1)
    return pairs


class SPL(ZooModule):
    """Teacher -> SPL pre-training -> fine-tuning on a classifier ``network`` (``features`` + N-way ``classifier``).

    Args:
        network: the student; its ``classifier`` is the N-way target head used in fine-tuning and evaluation.
        num_classes: N, the target classes (= the query classes, as in the paper's Kinetics-200 setting).
        label_rule: ``spl`` (the method), ``pseudo`` (teacher argmax) or ``weak`` (the query labels).
        num_sub_concepts: off-diagonal (w, t) classes kept, most frequent first; ``None`` keeps all N (N - 1).
        teacher_fraction / pretrain_fraction: shares of ``max_steps`` for stages 1 and 2; the rest fine-tunes.
        The teacher is a copy of ``network`` trained in stage 1 (the paper's teacher and student share the
        architecture); it only labels clips afterwards and gets no gradient.
        Each stage restarts the learning rate and decays it with a half cosine (``lr_schedule="cosine"``); the
        paper's schedules are for 3D CNNs on Kinetics, not given here for the image stand-in.
    """

    def __init__(self, network: nn.Module, num_classes: int, label_rule: Literal["spl", "pseudo", "weak"] = "spl",
                 num_sub_concepts: int | None = None, teacher_fraction: float = 1 / 3,
                 pretrain_fraction: float = 1 / 3, optimizer: str = "sgd", lr: float = 0.05,
                 weight_decay: float = 5e-4, ema_decay: float | None = None, **base):
        super().__init__(network, optimizer=optimizer, lr=lr, weight_decay=weight_decay, ema_decay=ema_decay, **base)
        if label_rule not in ("spl", "pseudo", "weak"):
            raise ValueError(f"unknown label_rule {label_rule!r}; use spl, pseudo or weak")
        self.num_classes, self.label_rule, self.num_sub_concepts = num_classes, label_rule, num_sub_concepts
        self.teacher_fraction, self.pretrain_fraction = teacher_fraction, pretrain_fraction
        self.teacher_network = copy.deepcopy(network)
        extra = (num_classes * (num_classes - 1) if num_sub_concepts is None else num_sub_concepts)
        self.num_pretrain_classes = num_classes + (extra if label_rule == "spl" else 0)
        self.pretrain_head = nn.Linear(network.num_features, self.num_pretrain_classes)
        # the (w, t) -> SPL class table, filled once the teacher is trained; in every checkpoint
        self.register_buffer("pair_to_class", torch.arange(num_classes)[:, None].repeat(1, num_classes))
        self.register_buffer("web_labelled", torch.tensor(False))

    # ------------------------------------------------------------------ stages
    def stage_bounds(self) -> tuple[int, int, int]:
        total = int(self.trainer.max_steps)
        teacher_end = max(1, round(total * self.teacher_fraction))
        pretrain_end = max(teacher_end + 1, round(total * (self.teacher_fraction + self.pretrain_fraction)))
        return teacher_end, pretrain_end, total

    def stage(self, step: int) -> str:
        teacher_end, pretrain_end, _ = self.stage_bounds()
        return "teacher" if step < teacher_end else "pretrain" if step < pretrain_end else "finetune"

    def train_only(self, stage: str) -> None:
        """Gradients for the stage's modules only: the teacher in stage 1; the student's body and the
        pre-training head in stage 2; the student with its N-way head in stage 3. Afterwards the teacher is frozen."""
        self.requires_grad_(False)
        if stage == "teacher":
            self.teacher_network.requires_grad_(True)
        else:
            self.network.requires_grad_(True)
            self.network.classifier.requires_grad_(stage == "finetune")
            self.pretrain_head.requires_grad_(stage == "pretrain")

    @torch.no_grad()
    def teacher_predictions(self, images: torch.Tensor) -> torch.Tensor:
        was_training = self.teacher_network.training
        self.teacher_network.eval()
        predictions = self.teacher_network(images).argmax(1)
        self.teacher_network.train(was_training)
        return predictions

    @torch.no_grad()
    def label_web_set(self) -> None:
        """Stage 1 -> 2: the teacher labels every web clip once; the pair frequencies fix the SPL space."""
        counts = torch.zeros(self.num_classes, self.num_classes, dtype=torch.long, device=self.device)
        correct = torch.zeros(2, device=self.device)   # teacher, query: right about the real class (analysis only)
        datamodule = self.trainer.datamodule
        for batch in datamodule.web_loader():
            batch = datamodule.on_after_batch_transfer(self.transfer_batch_to_device(batch, self.device, 0), 0)
            teacher = self.teacher_predictions(batch["clip"])
            counts += pair_counts(batch["label"], teacher, self.num_classes)
            correct += torch.stack([(teacher == batch["true"]).sum(), (batch["label"] == batch["true"]).sum()])
        self.pair_to_class.copy_(build_label_space(counts, self.num_sub_concepts))
        self.web_labelled.fill_(True)
        clips = counts.sum()
        self.log_dict({"web/teacher_agrees_with_query": counts.diagonal().sum() / clips,
                       "web/teacher_acc": correct[0] / clips, "web/query_acc": correct[1] / clips,
                       "web/sub_concepts": (self.pair_to_class >= self.num_classes).sum().float()})

    def pretrain_targets(self, weak: torch.Tensor, clips: torch.Tensor) -> torch.Tensor:
        if self.label_rule == "weak":
            return weak
        teacher = self.teacher_predictions(clips)
        return teacher if self.label_rule == "pseudo" else sub_pseudo_labels(weak, teacher, self.pair_to_class)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        labeled, web = batch["lb"], batch["ulb"]
        stage = self.stage(self.global_step)
        self.train_only(stage)
        if stage == "teacher":
            loss = F.cross_entropy(self.teacher_network(labeled["weak"]).float(), labeled["label"])
        elif stage == "pretrain":
            if not self.web_labelled:
                self.label_web_set()
            targets = self.pretrain_targets(web["label"], web["clip"])
            logits = self.pretrain_head(self.network.features(web["weak"])).float()
            loss = F.cross_entropy(logits, targets)
        else:
            loss = F.cross_entropy(self.network(labeled["weak"]).float(), labeled["label"])
        self.log(f"train/{stage}_loss", loss)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        """The base's optimiser and parameter groups; the lr restarts at each stage and follows a half cosine.
        Only the stage's parameters get gradients (:meth:`train_only`): SGD leaves the others where they are."""
        out = super().configure_optimizers()
        optimizer = out["optimizer"] if isinstance(out, dict) else out

        def factor(step: int) -> float:
            teacher_end, pretrain_end, total = self.stage_bounds()
            start, end = ((0, teacher_end) if step < teacher_end else (teacher_end, pretrain_end)
                          if step < pretrain_end else (pretrain_end, total))
            return 0.5 * (1 + math.cos(math.pi * (step - start) / max(1, end - start)))

        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # ------------------------------------------------------------------ evaluation
    def setup(self, stage: str) -> None:
        if not hasattr(self, "val_acc"):
            self.val_acc, self.teacher_acc = accuracy(self.num_classes), accuracy(self.num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network(images)

    def validation_step(self, batch: dict, batch_idx: int) -> dict:
        logits = self.network(batch["image"])
        self.val_acc(logits, batch["label"])
        self.teacher_acc(self.teacher_network(batch["image"]), batch["label"])
        self.log("val/acc", self.val_acc, on_epoch=True, prog_bar=True)
        self.log("val/teacher_acc", self.teacher_acc, on_epoch=True)
        return {"preds": logits.argmax(1)}
