"""The family's hosts: label-free objectives on an encoder, with the online evaluation every SSL paper reports.

- :class:`SSLModule`: the encoder ``network`` trained by a subclass's :meth:`~SSLModule.ssl_step`, plus an online
  linear probe on detached features, and on the validation schedule weighted kNN, probe accuracy and RankMe
  (``zoo/ssl/evaluation.py``). Papers plug into :class:`SimCLR` or :class:`BYOL`, or subclass this directly.
- :class:`SimCLR` (Chen et al., ICML 2020): a contrastive method, NT-Xent over the 2N views of the global batch.
- :class:`BYOL` (Grill et al., NeurIPS 2020): a non-contrastive one, an online predictor regressing a momentum
  target network's projection.
- :class:`Supervised`: the reference every SSL comparison needs beside random init, the same encoder trained with
  the labels (cross-entropy) on the same stream and budget.

Optimiser: both papers train with LARS (SimCLR: lr 0.3 x B/256 on ImageNet, 1.0 x B/256 for CIFAR-10, wd 1e-6 /
1e-4; BYOL: lr 0.2 x B/256, wd 1.5e-6), which the zoo's base does not have; the hosts use the base's SGD with
momentum 0.9 and a cosine decay to zero instead (the experiment files say which values).
BatchNorm: both official codes normalise over the global batch (SyncBN across TPU cores); on several GPUs add
``--trainer.sync_batchnorm=true`` to match, otherwise each GPU normalises its own share.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from zoo.core.module import ZooModule
from zoo.core.teacher import EMATeacher

from .encoders import MLPHead, feature_dim
from .evaluation import EVAL_SPLITS, FeatureStore, OnlineLinearProbe, evaluate_representation
from .losses import byol_loss, byol_target_decay, nt_xent_loss

__all__ = ["SSLModule", "SimCLR", "BYOL", "Supervised"]


class SSLModule(ZooModule, ABC):
    """Host of a self-supervised method on the encoder ``network`` (anything with ``num_features``, e.g.
    ``zoo.ssl.encoders.timm_encoder``).

    A subclass implements :meth:`ssl_step` (its loss on a training batch, and the backbone features of the views it
    encoded) and :meth:`embedding` (the representation its loss compares, for RankMe); it names the views it reads
    in ``view_names``. The host adds the probe's loss (on detached features: the encoder's gradient is the SSL
    loss's alone) and evaluates on the validation schedule.

    Args:
        network: the encoder.
        num_classes: classes of the evaluation labels (the probe's width); checked against the data module.
        knn_k, knn_temperature: weighted kNN's neighbours and temperature (20, 0.07: InstDisc, DINO).
        rankme_samples, rankme_eps: RankMe's held-out samples (the paper's 25,600, capped by the test split) and
            epsilon (1e-7).
        The optimisation arguments are the base's (``ZooModule``); changed defaults: SGD without Nesterov, cosine
        decay to zero, no EMA of ``network`` (a method with a momentum encoder keeps its own teacher).
    """

    view_names: tuple[str, ...] = ("view1", "view2")
    expected_metrics = ("train/ssl_loss", "train/probe_loss", "val/knn_acc", "val/linear_acc", "val/rankme",
                        "val/rankme_backbone")

    def __init__(self, network: nn.Module, num_classes: int = 10, knn_k: int = 20, knn_temperature: float = 0.07,
                 rankme_samples: int = 25600, rankme_eps: float = 1e-7,
                 optimizer: Literal["sgd", "adamw", "radam"] = "sgd", lr: float = 0.06, weight_decay: float = 5e-4,
                 nesterov: bool = False, cosine_cycles: float = 0.5, ema_decay: float | None = None, **base):
        super().__init__(network, optimizer=optimizer, lr=lr, weight_decay=weight_decay, nesterov=nesterov,
                         cosine_cycles=cosine_cycles, ema_decay=ema_decay, **base)
        self.num_features = feature_dim(network)
        self.num_classes = num_classes
        self.knn_k, self.knn_temperature = knn_k, knn_temperature
        self.rankme_samples, self.rankme_eps = rankme_samples, rankme_eps
        self.probe = OnlineLinearProbe(self.num_features, num_classes)
        self._stores: dict[str, FeatureStore] = {}

    # ------------------------------------------------------------- what a method implements
    @abstractmethod
    def ssl_step(self, batch: dict) -> tuple[torch.Tensor, list[torch.Tensor], dict[str, torch.Tensor]]:
        """The method's loss on ``batch``, the backbone features of each view it encoded (in the order of
        ``view_names``; the probe trains on them), and extra values to log under ``train/``."""

    @abstractmethod
    def embedding(self, features: torch.Tensor) -> torch.Tensor:
        """The representation the SSL loss compares, computed from backbone features (RankMe's input)."""

    # ------------------------------------------------------------------------- training
    def setup(self, stage: str) -> None:
        super().setup(stage)
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is None:
            return
        classes = getattr(datamodule, "num_classes", None)
        if classes is not None and classes != self.num_classes:
            raise ValueError(f"{type(self).__name__}(num_classes={self.num_classes}) but {datamodule.dataset} has "
                             f"{classes} classes: set model.init_args.num_classes={classes}")
        views = getattr(getattr(datamodule, "views", None), "names", None)
        if views is not None and set(self.view_names) - set(views):
            raise ValueError(f"{type(self).__name__} reads the views {self.view_names}, the data module serves "
                             f"{views}")

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        ssl_loss, features, logs = self.ssl_step(batch)
        labels = batch["label"].repeat(len(features))  # the same images, once per encoded view
        probe_loss, probe_acc = self.probe.loss(torch.cat(features), labels)
        self.log_dict({"train/loss": ssl_loss + probe_loss, "train/ssl_loss": ssl_loss,
                       "train/probe_loss": probe_loss, "train/probe_acc": probe_acc,
                       **{f"train/{k}": v for k, v in logs.items()}}, sync_dist=False)
        return ssl_loss + probe_loss

    # ----------------------------------------------------------------------- evaluation
    def on_validation_epoch_start(self) -> None:
        self._stores = {name: FeatureStore() for name in EVAL_SPLITS}

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        split = EVAL_SPLITS[dataloader_idx]
        features = self.network(batch["image"])
        extra = {"embedding": self.embedding(features)} if split == "test" else {}
        self._stores[split].add(batch["idx"], batch["label"], backbone=features, **extra)

    def on_validation_epoch_end(self) -> None:
        missing = [name for name in EVAL_SPLITS if not self._stores.get(name)]
        if missing:
            raise ValueError(f"SSL evaluation got no {missing} batches: it needs the validation loaders "
                             f"{EVAL_SPLITS} of zoo.ssl.data.SSLDataModule (bank = labeled train split, then test)")
        bank, test = (self._stores[name].gathered() for name in EVAL_SPLITS)
        metrics = evaluate_representation(bank, test, self.probe, self.num_classes, self.knn_k, self.knn_temperature,
                                          self.rankme_samples, self.rankme_eps)
        # every rank computed these from the same gathered features: no further reduction
        self.log_dict(metrics, prog_bar=True, sync_dist=False)
        self._stores = {}


class SimCLR(SSLModule):
    """SimCLR: two views of each image through encoder + projector, NT-Xent between them
    (``zoo.ssl.losses.nt_xent_loss``; negatives gathered across ranks, gradients flowing back through them).

    Both views go through the encoder in one batch of 2N (the official code concatenates them; BatchNorm sees both).

    Args:
        temperature: 0.5, the paper's CIFAR-10 setting (Appendix B.9 and the official README's CIFAR command;
            ImageNet with batch 4096 uses 0.1).
        projector_hidden_dim: the projector's hidden width (``None``: the encoder's width, as the paper).
        projector_out_dim: 128.
        gather_negatives: contrast with every rank's views (the global batch, as the paper) rather than this rank's.
    """

    def __init__(self, network: nn.Module, temperature: float = 0.5, projector_hidden_dim: int | None = None,
                 projector_out_dim: int = 128, gather_negatives: bool = True, **host):
        super().__init__(network, **host)
        self.temperature, self.gather_negatives = temperature, gather_negatives
        self.projector = MLPHead(self.num_features, projector_hidden_dim or self.num_features, projector_out_dim,
                                 num_layers=2, batch_norm=True, output_batch_norm=True)

    def embedding(self, features: torch.Tensor) -> torch.Tensor:
        return self.projector(features)

    def ssl_step(self, batch: dict):
        features = self.network(torch.cat([batch["view1"], batch["view2"]]))
        z1, z2 = self.embedding(features).chunk(2)
        loss = nt_xent_loss(z1, z2, self.temperature, self.gather_negatives)
        return loss, list(features.chunk(2)), {}


class BYOL(SSLModule):
    """BYOL: the online encoder + projector + predictor regresses the target network's projection of the other view;
    the target (an ``EMATeacher`` of encoder + projector, ``self.target``) moves only by
    ``t <- tau t + (1 - tau) online`` after each optimizer step, tau following ``byol_target_decay`` from
    ``tau_base`` to 1. Loss: ``byol_loss(q1, z2') + byol_loss(q2, z1')``.

    As the official code: each view is its own forward pass (BatchNorm statistics per view); the target runs its
    BatchNorm on batch statistics in training (``train_mode=True``), without gradient; the online encoder is the
    one evaluated and kept.

    Args:
        projector_hidden_dim, projector_out_dim, predictor_hidden_dim: 4096, 256, 4096 (the paper).
        tau_base: the target's decay at step 0, 0.996.
    """

    def __init__(self, network: nn.Module, projector_hidden_dim: int = 4096, projector_out_dim: int = 256,
                 predictor_hidden_dim: int = 4096, tau_base: float = 0.996, **host):
        super().__init__(network, **host)
        self.tau_base = tau_base
        self.total_steps: int | None = None
        self.projector = MLPHead(self.num_features, projector_hidden_dim, projector_out_dim)
        self.predictor = MLPHead(projector_out_dim, predictor_hidden_dim, projector_out_dim)
        self.target = EMATeacher(self.online_network(), buffers="copy", train_mode=True)

    def online_network(self) -> nn.Module:
        """Encoder + projector, the network the target averages (built on the fly: not a second registration)."""
        return nn.Sequential(self.network, self.projector)

    def embedding(self, features: torch.Tensor) -> torch.Tensor:
        return self.projector(features)

    def ssl_step(self, batch: dict):
        features = [self.network(batch[name]) for name in self.view_names]
        predictions = [self.predictor(self.embedding(h)) for h in features]
        with torch.no_grad():
            targets = [self.target(batch[name]) for name in self.view_names]
        loss = byol_loss(predictions[0], targets[1]) + byol_loss(predictions[1], targets[0])
        return loss, features, {"target_decay": self.target_decay_at(self.global_step)}

    def on_fit_start(self) -> None:
        self.total_steps = int(self.trainer.estimated_stepping_batches)  # K of the tau schedule

    def target_decay_at(self, step: int) -> float:
        """tau at optimizer step ``step`` of the run's ``total_steps`` (set when fitting starts)."""
        if self.total_steps is None:
            raise RuntimeError("BYOL.total_steps (K of the target-decay schedule) is set in on_fit_start; set it by "
                               "hand to step the module outside a Trainer")
        return byol_target_decay(step, self.total_steps, self.tau_base)

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        self.target.update(self.online_network(), self.target_decay_at(self.global_step))


class Supervised(SSLModule):
    """The supervised reference encoder: ``network`` + a linear classifier trained with cross-entropy on the labels
    that ride along with the stream (the one host that reads them), on one view per image
    (``zoo.ssl.views.SupervisedViews``: crop and flip). Evaluated like every SSL method (frozen-feature kNN, linear
    probe, RankMe of the backbone), so a table can put "what labels buy" beside each label-free objective at the
    same encoder and budget.
    """

    view_names = ("view1",)

    def __init__(self, network: nn.Module, **host):
        super().__init__(network, **host)
        self.classifier = nn.Linear(self.num_features, self.num_classes)

    def embedding(self, features: torch.Tensor) -> torch.Tensor:
        return features  # the loss compares no embedding: RankMe reads the representation itself

    def ssl_step(self, batch: dict):
        features = self.network(batch["view1"])
        logits = self.classifier(features).float()  # cross-entropy in float32 under bf16 autocast
        loss = F.cross_entropy(logits, batch["label"])
        accuracy = (logits.argmax(1) == batch["label"]).float().mean()
        return loss, [features], {"supervised_acc": accuracy}
