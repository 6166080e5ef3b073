"""SimMatchV2: Semi-Supervised Learning with Graph Consistency (Zheng et al., ICCV 2023).

Every augmented view is a graph node (a label and an L2-normalised 128-d embedding from a projection head on
LayerNorm-ed backbone features); edges are softmax similarities (temperature ``t``). An EMA teacher embeds the
labeled images and the weak unlabeled views; the student sees the labeled images and the strong views.

- node-node: soft CE(student strong logits, pseudo-label), masked where the teacher's (aligned) confidence
  reaches ``threshold``. The pseudo-label is message passing from labeled nodes over edges (our reading of the
  paper's edge-node consistency; the official code has only the three loss terms named here): the unlabeled node
  and its ``topn`` nearest labeled-bank nodes form a graph with softmax affinities (no self-loops), labels
  propagate in closed form ``(1 - alpha)(I - alpha A)^-1 Y`` and the unlabeled node's row is kept.
- edge-edge: CE between the student's and the teacher's similarity distributions over an unlabeled FIFO bank.
- node-edge: the student's edges aggregate the bank's stored teacher probabilities into a node prediction,
  trained (CE) towards the teacher's probabilities.

    loss = CE(labeled) + lambda_nn * L_nn + lambda_ee * L_ee + lambda_ne * L_ne

Follows the official code (mingkai-zheng/SimMatchV2 @ f0e054c, ``models/simmatchv2.py`` and ``main.py``),
which is ImageNet-only: distribution alignment divides by the *old* running mean, then updates it with the
batch mean of the raw probabilities (gathered over ranks); the mask comes from the aligned probabilities
(``>=``); banks are read before the step and written after the losses (labeled bank by sample index with
teacher embeddings, FIFO unlabeled bank of ``bank_batches`` global unlabeled batches holding teacher
embeddings and aligned probabilities, both gathered over ranks); non-finite ``L_ee`` / ``L_ne`` are replaced by
0 (the unlabeled probabilities start at zero, so ``L_ne`` is infinite on the first step); the teacher's
BatchNorm uses batch statistics (official default, ``--eman`` off); EMA decays above 0.996 are constant, lower
ones follow the official cosine ramp to 1. Several strong views (``strong*`` keys) average ``L_ee`` / ``L_ne``
and concatenate for ``L_nn``, as the official multi-crop loop does.
Differences: the teacher batch is not shuffled across GPUs (the official DDP shuffle only changes which
samples share BatchNorm statistics); graph and bank arithmetic runs in float32 outside autocast; weight decay
skips biases and norms (the house optimiser); CIFAR values the official code does not cover are in the README.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from zoo.core.module import ZooModule

from .graph import (batch_statistics, distribution_alignment, edge_edge_loss, finite_or_zero, graph_pseudo_labels,
                    node_edge_loss, node_node_loss, update_labeled_bank, update_unlabeled_bank)

__all__ = ["SimMatchV2", "GraphNet"]

BANKS = ("labeled_bank", "labeled_onehot", "unlabeled_bank", "unlabeled_probs", "unlabeled_ptr")


# ------------------------------------------------------------------------------------------------ network
class GraphNet(nn.Module):
    """Backbone -> LayerNorm (``feature_norm``) -> classifier, and a 2-layer MLP head -> L2-normalised embedding."""

    def __init__(self, backbone: nn.Module, embedding_dim: int = 128, feature_norm: bool = True):
        super().__init__()
        width = backbone.classifier.in_features
        self.backbone = backbone
        self.norm = nn.LayerNorm(width) if feature_norm else nn.Identity()
        self.head = nn.Sequential(nn.Linear(width, width), nn.ReLU(inplace=True), nn.Linear(width, embedding_dim))

    @property
    def classifier(self) -> nn.Linear:
        return self.backbone.classifier

    def forward(self, x: torch.Tensor, embed: bool = False):
        h = self.norm(self.backbone.features(x))
        logits = self.backbone.classifier(h)
        return (logits, F.normalize(self.head(h), dim=1)) if embed else logits


# ------------------------------------------------------------------------------------------------- module
class SimMatchV2(ZooModule):
    """SimMatchV2. Algorithm defaults are the official code's (ImageNet 10% script); optimisation defaults are
    the standard CIFAR protocol (FixMatch's). Banks are sized from the data module in ``setup``.

    Args:
        network: backbone with ``features(x)`` and ``classifier``; wrapped in :class:`GraphNet`.
        embedding_dim: projection head output (128). feature_norm: LayerNorm before classifier and head.
        threshold: confidence for the node-node mask, on aligned teacher probabilities (0.7).
        temperature: similarity temperature t (0.1). alpha: propagation weight (0.1).
        topn: labeled neighbours per unlabeled node (128; at most the number of labeled samples).
        bank_batches: unlabeled bank size in global unlabeled batches (official ``--k`` 256).
        lambda_nn, lambda_ee, lambda_ne: loss weights (10, 5, 5; the 1% ImageNet script uses 10, 10, 10).
        distribution_alignment, da_momentum: align teacher probabilities with a running mean (on, 0.9).
        teacher_batch_stats: teacher BatchNorm on batch statistics (official); False with
            ``ema_buffers="average"`` is the official ``--eman`` variant.
    """

    def __init__(self, network: nn.Module, embedding_dim: int = 128, feature_norm: bool = True,
                 threshold: float = 0.7, temperature: float = 0.1, alpha: float = 0.1, topn: int = 128,
                 bank_batches: int = 256, lambda_nn: float = 10.0, lambda_ee: float = 5.0, lambda_ne: float = 5.0,
                 distribution_alignment: bool = True, da_momentum: float = 0.9, teacher_batch_stats: bool = True,
                 **base):
        super().__init__(GraphNet(network, embedding_dim, feature_norm), **base)
        self.threshold, self.temperature, self.alpha, self.topn = threshold, temperature, alpha, topn
        self.bank_batches = bank_batches
        self.lambda_nn, self.lambda_ee, self.lambda_ne = lambda_nn, lambda_ee, lambda_ne
        self.use_da, self.da_momentum = distribution_alignment, da_momentum
        self.teacher_batch_stats, self.embedding_dim = teacher_batch_stats, embedding_dim
        num_classes = network.classifier.out_features
        self.register_buffer("da_mean", torch.full((1, num_classes), 1.0 / num_classes))

    # ------------------------------------------------------------------------------------------- banks
    def setup(self, stage: str) -> None:
        super().setup(stage)
        if hasattr(self, "labeled_bank"):
            return
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None or not hasattr(dm, "labeled_idx"):
            raise RuntimeError("SimMatchV2 sizes its memory banks from a SemiSupervisedDataModule (labeled_idx)")
        labels = torch.as_tensor(dm.data.y_train[dm.labeled_idx])
        if self.topn > len(labels):
            raise ValueError(f"topn={self.topn} exceeds the {len(labels)} labeled samples; set topn <= {len(labels)}")
        num_classes, dim = self.da_mean.shape[1], self.embedding_dim
        unlabeled_size = self.bank_batches * dm.batch_size * dm.uratio  # official K = k * B * mu * world_size
        self.register_buffer("labeled_bank", F.normalize(torch.randn(len(labels), dim), dim=1))
        self.register_buffer("labeled_onehot", F.one_hot(labels, num_classes).float())
        self.register_buffer("unlabeled_bank", F.normalize(torch.randn(unlabeled_size, dim), dim=1))
        self.register_buffer("unlabeled_probs", torch.zeros(unlabeled_size, num_classes))
        self.register_buffer("unlabeled_ptr", torch.zeros(1, dtype=torch.long))

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Outside ``trainer.fit`` (e.g. ``load_from_checkpoint``) the banks take the checkpoint's shapes."""
        for name in BANKS:
            if not hasattr(self, name):
                self.register_buffer(name, torch.empty_like(checkpoint["state_dict"][name]))

    def ema_decay_at(self, step: int) -> float:
        if self.ema_decay > 0.996:
            return self.ema_decay
        total = max(1, int(self.trainer.estimated_stepping_batches))
        return 1 - (1 - self.ema_decay) * (math.cos(math.pi * (step + 1) / total) + 1) / 2

    # ------------------------------------------------------------------------------------------- steps
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        lb, ulb = batch["lb"], batch["ulb"]
        num_lb = lb["weak"].shape[0]
        strong_views = [ulb[k] for k in sorted(ulb) if k.startswith("strong")]

        # snapshots: the banks are written before backward, which still needs the rows the losses read
        unlabeled_bank, unlabeled_probs = self.unlabeled_bank.clone(), self.unlabeled_probs.clone()
        with torch.no_grad(), batch_statistics(self.ema.module, self.teacher_batch_stats):
            logits_t, feat_t = self.ema(torch.cat([lb["weak"], ulb["weak"]]), embed=True)
        logits_s, feat_s = self.network(torch.cat([lb["weak"], strong_views[0]]), embed=True)
        extra = [self.network(view, embed=True) for view in strong_views[1:]]
        logits_strong = [logits_s[num_lb:]] + [logits for logits, _ in extra]
        feats_strong = [feat_s[num_lb:]] + [feat for _, feat in extra]

        with torch.autocast(self.device.type, enabled=False):
            feat_t_lb, feat_t_ulb = feat_t[:num_lb].float(), feat_t[num_lb:].float()
            probs = torch.softmax(logits_t[num_lb:].float(), dim=1)
            if self.use_da:
                probs, new_mean = distribution_alignment(probs, self.da_mean, self.da_momentum)
                self.da_mean.copy_(new_mean)
            pseudo = graph_pseudo_labels(feat_t_ulb, probs, self.labeled_bank, self.labeled_onehot, self.topn,
                                         self.temperature, self.alpha)
            mask = (probs.max(dim=1).values >= self.threshold).float()
            views = len(strong_views)
            sup_loss = F.cross_entropy(logits_s[:num_lb].float(), lb["label"])
            nn_loss = node_node_loss(torch.cat(logits_strong).float(), pseudo.repeat(views, 1), mask.repeat(views))
            ee_loss = finite_or_zero(sum(edge_edge_loss(f.float(), feat_t_ulb, unlabeled_bank, self.temperature)
                                         for f in feats_strong) / views)
            ne_loss = finite_or_zero(sum(node_edge_loss(f.float(), probs, unlabeled_bank, unlabeled_probs,
                                                        self.temperature) for f in feats_strong) / views)
        loss = sup_loss + self.lambda_nn * nn_loss + self.lambda_ee * ee_loss + self.lambda_ne * ne_loss

        update_labeled_bank(self.labeled_bank, feat_t_lb, lb["idx"])
        update_unlabeled_bank(self.unlabeled_bank, self.unlabeled_probs, self.unlabeled_ptr, feat_t_ulb, probs)

        # the unlabeled stream's true labels are used for this diagnostic only, never for training
        correct = (pseudo.argmax(dim=1) == ulb["label"]).float()
        self.log_dict({"train/loss": loss, "train/sup_loss": sup_loss, "train/nn_loss": nn_loss,
                       "train/ee_loss": ee_loss, "train/ne_loss": ne_loss, "train/mask_ratio": mask.mean(),
                       "train/pseudo_label_acc": (correct * mask).sum() / mask.sum().clamp_min(1)})
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> dict:
        return self.classifier_validation_step(batch)
