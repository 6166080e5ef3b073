"""MDCS (Zhao et al., ICCV 2023; official code ``fistyee/MDCS``, ``model/loss.py`` ``MDCSLoss``).

A network with shared early layers and E experts (own later stages and cosine classifier each) is trained on a
long-tailed set with two views of every image: weak and strong.

- Diversity loss (DL): expert e minimises the logit-adjusted cross-entropy ``CE(z_e + tau_e log pi, y)`` on both
  views, pi the training class prior. tau = (-0.5, 1, 2.5): one expert favours the head, one is balanced, one
  favours the tail (Menon et al.'s logit adjustment is tau = 1).
- Consistency self-distillation (CS): per expert, ``KL(softmax(adjusted weak logits) || softmax(adjusted strong
  logits))``, the weak view the detached teacher, averaged over the instances it keeps;
- Confident instance sampling (CIS): it keeps the instances whose weak-view (teacher) prediction is the true label.
- ``L = sum_e CE_e + 0.6 * min(epoch / 20, 1) * sum_e KL_e``. Inference: the mean of the experts' raw logits.

The baselines are switches of the same module: one expert, one view, no consistency, ``taus=(0,)`` (plain
cross-entropy) or ``taus=(1,)`` (logit-adjusted cross-entropy, Menon et al. 2021).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from zoo.core.metrics import accuracy
from zoo.core.module import ZooModule
from zoo.core.nets import CifarBasicBlock

__all__ = ["MDCS", "MultiExpertResNet", "NormedLinear", "mdcs_loss", "shot_groups"]


class NormedLinear(nn.Module):
    """Cosine classifier: ``normalize(x) @ normalize(W)`` (official ``NormedLinear``, weight ``(in, out)`` with
    unit columns at init)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(in_features, out_features).uniform_(-1, 1).renorm_(2, 1, 1e-5) * 1e5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1) @ F.normalize(self.weight, dim=0)


class MultiExpertResNet(nn.Module):
    """The official ``expert_resnet_cifar.ResNet_s``: a CIFAR ResNet (depth 6n+2) whose stem and first stage are
    shared, and whose second and third stages, pooling and classifier are one copy per expert.

    Args:
        widths: channels of the three stages; (16, 24, 48) is the official ``reduce_dimension=True`` (three
            experts at about the cost of one ResNet-32); (16, 32, 64) is the plain ResNet-32.
        cosine_classifier: ``NormedLinear`` times ``scale`` (official ``use_norm=True``, ``s=30``); else a linear
            layer (the plain-CE / logit-adjustment baselines).
    Returns from ``forward``: the experts' logits, ``(E, B, C)``.
    """

    def __init__(self, num_classes: int = 10, num_experts: int = 3, depth: int = 32,
                 widths: tuple[int, int, int] = (16, 24, 48), cosine_classifier: bool = True, scale: float = 30.0,
                 in_channels: int = 3):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"depth must be 6n+2 (20, 32, 44, 56, 110), not {depth}")
        n = (depth - 2) // 6

        def stage(c_in: int, c_out: int, stride: int) -> nn.Sequential:
            return nn.Sequential(*[CifarBasicBlock(c_in if i == 0 else c_out, c_out, stride if i == 0 else 1)
                                   for i in range(n)])

        self.num_experts, self.num_classes = num_experts, num_classes
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]),
                                  nn.ReLU(), stage(widths[0], widths[0], 1))
        self.experts = nn.ModuleList(nn.Sequential(stage(widths[0], widths[1], 2), stage(widths[1], widths[2], 2),
                                                   nn.AdaptiveAvgPool2d(1), nn.Flatten())
                                     for _ in range(num_experts))
        make_classifier = (lambda: NormedLinear(widths[2], num_classes)) if cosine_classifier else (
            lambda: nn.Linear(widths[2], num_classes))
        self.classifiers = nn.ModuleList(make_classifier() for _ in range(num_experts))
        self.scale = scale if cosine_classifier else 1.0
        for m in self.modules():  # official ``_weights_init``: Kaiming normal (fan-in) on convolutions and linears
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shared = self.stem(x)
        return torch.stack([head(expert(shared)) * self.scale for expert, head in zip(self.experts, self.classifiers)])


def mdcs_loss(expert_logits: torch.Tensor, labels: torch.Tensor, log_prior: torch.Tensor, taus: torch.Tensor,
              num_weak: int | None, consistency_weight: float) -> dict[str, torch.Tensor]:
    """DL + ramped CS with CIS (official ``MDCSLoss.forward``), in float32.

    ``expert_logits``: ``(E, N, C)``, rows ``[:num_weak]`` the weak view and ``[num_weak:]`` the strong view of the
    same images (``num_weak=None``: one view, no consistency); ``labels``: ``(N,)``; ``log_prior``: ``(C,)``;
    ``taus``: ``(E,)``; ``consistency_weight``: 0.6 times the ramp, already multiplied.
    """
    adjusted = expert_logits.float() + taus.view(-1, 1, 1) * log_prior  # (E, N, C)
    cross_entropy = torch.stack([F.cross_entropy(z, labels) for z in adjusted]).sum()
    out = {"ce_loss": cross_entropy, "loss": cross_entropy}
    if num_weak is None:
        return out
    teacher, student = adjusted[:, :num_weak].detach(), adjusted[:, num_weak:]
    confident = teacher.argmax(-1) == labels[:num_weak]  # CIS, by the true label: (E, B)
    kl = expert_logits.new_zeros((), dtype=torch.float32)
    for e in range(len(adjusted)):
        if confident[e].any():  # the mean over the kept instances ("batchmean" of the masked rows)
            kl = kl + F.kl_div(F.log_softmax(student[e, confident[e]], -1), F.softmax(teacher[e, confident[e]], -1),
                               reduction="batchmean")
    out.update(kl_loss=kl, confident_fraction=confident.float().mean(), loss=cross_entropy + consistency_weight * kl)
    return out


def shot_groups(class_counts: list[int], many_above: int = 100, few_below: int = 20) -> dict[str, torch.Tensor]:
    """Class masks of the official ``test.py``: many (> 100 training images), medium (20..100), few (< 20)."""
    counts = torch.tensor(class_counts)
    return {"many": counts > many_above, "medium": (counts <= many_above) & (counts >= few_below),
            "few": counts < few_below}


class MDCS(ZooModule):
    """MDCS on a :class:`MultiExpertResNet`; training batches ``batch["lb"]`` with ``weak`` (and ``strong``) views.

    Args:
        taus: the logit-adjustment factor of each expert (official ``MDCSLoss``: -0.5, 1, 2.5); one per expert.
        consistency_weight: the weight of CS (official 0.6); 0 trains on the weak view only (the baselines).
        consistency_warmup_epochs: CS weight ramp ``min(epoch / 20, 1)``, ``epoch`` counted from 1 (official).
        class_counts: training images per class; default: the data module's ``class_counts``.
        many_above / few_below: the many/medium/few-shot thresholds of the official ``test.py`` (100, 20).
        Optimisation defaults (official ``config_cifar*_mdcs.json``): SGD Nesterov, momentum 0.9, lr 0.1, weight
        decay 5e-4 on every parameter, lr x0.1 at epochs 200, 320, 380 of 400; the 20-epoch linear warm-up is
        ``warmup_steps`` (20 x steps per epoch, set in the experiment).
    """

    def __init__(self, network: MultiExpertResNet, taus: tuple[float, ...] = (-0.5, 1.0, 2.5),
                 consistency_weight: float = 0.6, consistency_warmup_epochs: int = 20,
                 class_counts: list[int] | None = None, many_above: int = 100, few_below: int = 20,
                 optimizer: str = "sgd", lr: float = 0.1, weight_decay: float = 5e-4, nesterov: bool = True,
                 lr_schedule: str = "step", lr_milestones: tuple[float, ...] = (0.5, 0.8, 0.95),
                 decay_norm_and_bias: bool = True, ema_decay: float | None = None, **base):
        super().__init__(network, optimizer=optimizer, lr=lr, weight_decay=weight_decay, nesterov=nesterov,
                         lr_schedule=lr_schedule, lr_milestones=lr_milestones,
                         decay_norm_and_bias=decay_norm_and_bias, ema_decay=ema_decay, **base)
        if len(taus) != network.num_experts:
            raise ValueError(f"{len(taus)} taus for {network.num_experts} experts; give one tau per expert")
        self.register_buffer("taus", torch.tensor(taus, dtype=torch.float32), persistent=False)
        self.consistency_weight, self.consistency_warmup_epochs = consistency_weight, consistency_warmup_epochs
        self.class_counts, self.many_above, self.few_below = class_counts, many_above, few_below

    # ------------------------------------------------------------------ the objective
    def consistency_weight_now(self) -> float:
        epoch = self.current_epoch + 1  # the official trainer counts epochs from 1
        return self.consistency_weight * min(epoch / self.consistency_warmup_epochs, 1.0)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        labeled = batch["lb"]
        labels = labeled["label"]
        if self.consistency_weight > 0:  # one forward over both views (the official batch is their concatenation)
            images, num_weak = torch.cat([labeled["weak"], labeled["strong"]]), len(labels)
            labels = torch.cat([labels, labels])
        else:
            images, num_weak = labeled["weak"], None
        out = mdcs_loss(self.network(images), labels, self.log_prior, self.taus, num_weak,
                        self.consistency_weight_now())
        self.log_dict({f"train/{name}": value for name, value in out.items()})
        return out["loss"]

    # ------------------------------------------------------------------ inference
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The prediction: the mean of the experts' logits (official ``output``)."""
        return self.network(images).mean(0)

    def setup(self, stage: str) -> None:
        if self.class_counts is None:
            self.class_counts = list(self.trainer.datamodule.class_counts)
        counts = torch.tensor(self.class_counts, dtype=torch.float32)
        self.register_buffer("log_prior", (counts / counts.sum()).log().to(self.taus.device), persistent=False)
        self.groups = {name: mask for name, mask in shot_groups(self.class_counts, self.many_above,
                                                                self.few_below).items() if mask.any()}
        if not hasattr(self, "val_acc"):
            c = self.network.num_classes
            self.val_acc = accuracy(c)
            # per-class recall of the ensemble and of each expert, for the many/medium/few-shot means
            self.class_recall = nn.ModuleList(MulticlassAccuracy(c, average="none")
                                              for _ in range(self.network.num_experts + 1))

    def validation_step(self, batch: dict, batch_idx: int) -> dict:
        expert_logits = self.network(batch["image"]).float()
        ensemble = expert_logits.mean(0)
        self.val_acc(ensemble, batch["label"])
        self.log("val/acc", self.val_acc, on_epoch=True, prog_bar=True)
        for metric, logits in zip(self.class_recall, [ensemble, *expert_logits]):
            metric.update(logits, batch["label"])
        return {"preds": ensemble.argmax(1)}

    def on_validation_epoch_end(self) -> None:
        """``val/{many,medium,few}_acc``: mean per-class accuracy over each group (official ``test.py``); the same
        per expert (``val/expert{e}_*``), which shows the experts' diversity. Empty groups are not logged."""
        for index, metric in enumerate(self.class_recall):
            recall, prefix = metric.compute(), "val/" if index == 0 else f"val/expert{index - 1}_"
            metric.reset()
            if index > 0:
                self.log(f"{prefix}acc", recall.mean())
            for name, mask in self.groups.items():
                self.log(f"{prefix}{name}_acc", recall[mask.to(recall.device)].mean())

    @property
    def expected_metrics(self) -> tuple[str, ...]:
        return ("val/acc", *(f"val/{name}_acc" for name in self.groups))
