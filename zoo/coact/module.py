"""CoACT: consistency-guided asynchronous contrastive tuning for few-shot class-incremental tuning (Roy, Dolatabadi,
Afkanpour & Etemad, TMLR 2025; official code ``ShuvenduRoy/CoACT-FSCIL``).

A pretrained ViT learns new classes from K shots per class and session, session after session:

- Student: the ViT with LoRA adapters on the query and value projections of every block, a projector (identity by
  default, official ``num_mlp=0``) and a bias-free classifier over all classes. Teacher (the *asynchronous* key
  encoder): the same network WITHOUT the adapters, ``t <- m t + (1 - m) s`` (m = 0.999) from the student's shared
  weights before every key forward. While the backbone is frozen the teacher's backbone stays the pretrained one.
- Base session: classifier rows <- class prototypes (mean features), then
  ``L = CE(student(v1)) + SupCon([z_s(v1), z_t(v2)], y; tau = 0.07)`` for ``base_epochs`` epochs, cosine lr.
  *Controlled fine-tuning*: from epoch ``tune_from_epoch`` on, the pretrained blocks from ``tune_from_block`` on
  (and the final norm) train too, at ``lr * encoder_lr_factor``.
- Incremental session s: new classifier rows <- prototypes of the K-shot set; the ``incremental_tuning`` parts
  train with ``L = CE + SupCon([z_s(v1), z_tb(v2), z_p(v2)], y) + || f_s(v1) - f_b(v1) ||^2`` (mean), with
  ``z_tb`` the base session's teacher, ``z_p`` the pretrained network and ``f_b`` the frozen base-session
  student's logits (the consistency to the base session), at ``lr * incremental_lr_factor``.

Switches give the baselines with the same code: ``supcon_weight: 0, consistency_weight: 0`` is plain fine-tuning
(of LoRA, or of the whole backbone with ``lora_rank: 0, tune_from_block: -1``); ``lr: 0, lora_rank: 0`` is prototype tuning (the
official baseline: a frozen backbone and prototype classifiers).
"""
from __future__ import annotations

import copy
import math
import re
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchmetrics import MeanMetric

from zoo.core.datasets import MissingWeightsError
from zoo.core.module import ZooModule
from zoo.core.teacher import EMATeacher

__all__ = ["CoACT", "FSCITNetwork", "Frozen", "SplitQKV", "ViTBackbone", "consistency_loss", "supcon_loss"]


class SplitQKV(nn.Module):
    """timm's fused ``qkv`` projection as three Linear layers named as Hugging Face's ViT names them (``query``,
    ``key``, ``value``), so LoRA can adapt the query and value only, as the official ``target_modules``. The
    output is the same concatenation, so the attention block runs unchanged."""

    def __init__(self, qkv: nn.Linear):
        super().__init__()
        width = qkv.out_features // 3
        for i, name in enumerate(("query", "key", "value")):
            linear = nn.Linear(qkv.in_features, width, bias=qkv.bias is not None)
            with torch.no_grad():
                linear.weight.copy_(qkv.weight[i * width : (i + 1) * width])
                if qkv.bias is not None:
                    linear.bias.copy_(qkv.bias[i * width : (i + 1) * width])
            setattr(self, name, linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.query(x), self.key(x), self.value(x)], dim=-1)


class ViTBackbone(nn.Module):
    """A timm ViT returning its class-token features (``num_classes=0``), with split query/key/value projections.

    Args:
        name: timm model name; the paper's encoder is ViT-B/16 pretrained on ImageNet-21k
            (``vit_base_patch16_224.orig_in21k``, the weights of the official ``google/vit-base-patch16-224-in21k``).
        pretrained: load timm's weights for ``name`` (Hugging Face hub cache; offline a MissingWeightsError).
        checkpoint: a zoo run whose student backbone (``network.backbone.*``, no LoRA) initialises this one: the
            locally pre-trained "foundation" of the CPU settings (``experiments/coact_foundation_mnist.yaml``).
        model_kwargs: passed to ``timm.create_model`` (a tiny ViT: ``img_size``, ``patch_size``, ``depth``, ...).
    """

    def __init__(self, name: str = "vit_base_patch16_224.orig_in21k", pretrained: bool = True,
                 checkpoint: str | None = None, model_kwargs: dict | None = None):
        super().__init__()
        import timm

        try:
            self.vit = timm.create_model(name, pretrained=pretrained, num_classes=0, **(model_kwargs or {}))
        except Exception as err:  # offline: the hub cannot be reached
            if not pretrained:
                raise
            raise MissingWeightsError(
                f"could not load the pretrained weights of timm model {name!r} ({type(err).__name__}: {err}); with "
                "internet they download once into the Hugging Face cache (HF_HOME); offline put them there, or set "
                "pretrained: false (random init) or checkpoint: <a coact_foundation run's last.ckpt>") from err
        for block in self.vit.blocks:
            block.attn.qkv = SplitQKV(block.attn.qkv)
        self.num_features = self.vit.num_features
        if checkpoint:
            self.load_foundation(checkpoint)

    def load_foundation(self, path: str) -> None:
        if not Path(path).is_file():
            raise MissingWeightsError(
                f"foundation checkpoint not found: {Path(path).resolve()}\n  build it first: make train "
                "EXP=coact_foundation_mnist (python -m zoo fit --config experiments/coact_foundation_mnist.yaml)")
        state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
        prefix = "network.backbone."
        weights = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
        if any("lora_" in k for k in weights):
            raise ValueError(f"{path}: a foundation must be trained without LoRA (lora_rank: 0)")
        self.load_state_dict(weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit(x)


class FSCITNetwork(nn.Module):
    """Backbone -> (features, projector(features), classifier(features)), the official ``EncoderWrapper``."""

    def __init__(self, backbone: nn.Module, num_classes: int, projection_layers: int = 0, projection_dim: int = 128,
                 classifier_bias: bool = False):
        super().__init__()
        width = backbone.num_features
        self.backbone = backbone
        if projection_layers == 0:
            self.projector = nn.Identity()
        elif projection_layers == 1:
            self.projector = nn.Linear(width, projection_dim)
        elif projection_layers == 2:
            self.projector = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, projection_dim))
        else:
            raise ValueError(f"projection_layers must be 0, 1 or 2 (official num_mlp), got {projection_layers}")
        self.classifier = nn.Linear(width, num_classes, bias=classifier_bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        features = self.backbone(x)
        return features, self.projector(features), self.classifier(features)


class Frozen(nn.Module):
    """A frozen copy of a network that never trains and always runs in eval mode (the base-session model and the
    pretrained network of the incremental sessions)."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.module = copy.deepcopy(network).requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True):
        return super().train(False)

    @torch.no_grad()
    def forward(self, x):
        return self.module(x)


def supcon_loss(views: torch.Tensor, labels: torch.Tensor, temperature: float = 0.07,
                base_temperature: float = 0.07) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020; official ``losses/contrastive.py``, mode "all").

    ``views``: (B, V, D) L2-normalised embeddings. Every one of the B*V embeddings is an anchor; its positives are
    the other embeddings of its class; ``-tau/tau_b * mean over anchors of mean_{p} log softmax_{a != anchor}(z.z_a
    / tau)_p``. An anchor without positives contributes 0 to the mean, as the official edge case."""
    batch, num_views, _ = views.shape
    anchors = views.transpose(0, 1).reshape(num_views * batch, -1).float()
    y = labels.repeat(num_views)
    similarity = anchors @ anchors.T / temperature
    self_pair = torch.eye(len(y), dtype=torch.bool, device=y.device)
    log_prob = similarity.masked_fill(self_pair, -math.inf).log_softmax(dim=1)
    positives = (y[:, None] == y[None, :]) & ~self_pair
    mean_log_prob_pos = log_prob.masked_fill(~positives, 0.0).sum(1) / positives.sum(1).clamp_min(1)
    return -(temperature / base_temperature) * mean_log_prob_pos.mean()


def consistency_loss(logits: torch.Tensor, base_logits: torch.Tensor) -> torch.Tensor:
    """Mean squared difference between the current logits and the frozen base-session model's (official
    ``F.mse_loss(logits, logits_base)`` in ``inc_train_one_epoch``), in float32."""
    return F.mse_loss(logits.float(), base_logits.float())


class CoACT(ZooModule):
    """CoACT on a :class:`~zoo.coact.data.FewShotIncrementalDataModule` session stream (module docstring).

    Args:
        backbone: a :class:`ViTBackbone` (or any module with ``num_features`` and named ``blocks.<i>.``).
        num_classes: classes of all sessions (the data module's ``num_classes``).
        lora_rank, lora_alpha, lora_dropout, lora_targets, lora_blocks: the adapters (official ``LoraConfig``:
            r 16, alpha 16, dropout 0.1, ``query``/``value``, all blocks); ``lora_rank: 0`` trains without LoRA.
        projection_layers, projection_dim: the contrastive projector (official ``num_mlp`` 0, ``moco_dim`` 128).
        classifier_bias: official ``add_bias_in_classifier`` (False).
        temperature, teacher_momentum: SupCon's tau (0.07) and the teacher's EMA momentum (0.999).
        ce_weight, supcon_weight, consistency_weight: loss weights (1, 1, 1).
        tune_from_block, tune_from_epoch, encoder_lr_factor: controlled fine-tuning (official
            ``encoder_ft_start_layer`` / ``_epoch``, ``encoder_lr_factor``; CIFAR-100 FSCIT: 9, 0, 0.001); ``None``
            keeps the pretrained weights frozen, ``-1`` tunes all of them.
        incremental_tuning: what trains in incremental sessions (official ``incft_layers``; CIFAR-100: classifier).
        incremental_lr_factor: their lr is ``lr * incremental_lr_factor`` (official ``inc_ft_lr_factor``, 0.001).
        prototype_init: base classifier rows from prototypes before training (official
            ``start_training_with_prototypes``); incremental rows always are.
        lr, weight_decay, nesterov: official SGD (0.1, 5e-4 on every parameter, Nesterov, momentum 0.9).
        ema_decay: the base's EMA of the network, off: CoACT's teacher is its own.
        **base: the rest of :class:`ZooModule` (``optimizer``: sgd, or adamw for the CPU foundation).
    """

    def __init__(self, backbone: nn.Module, num_classes: int, lora_rank: int = 16, lora_alpha: int = 16,
                 lora_dropout: float = 0.1, lora_targets: tuple[str, ...] = ("query", "value"),
                 lora_blocks: list[int] | None = None, projection_layers: int = 0, projection_dim: int = 128,
                 classifier_bias: bool = False, temperature: float = 0.07, teacher_momentum: float = 0.999,
                 ce_weight: float = 1.0, supcon_weight: float = 1.0, consistency_weight: float = 1.0,
                 tune_from_block: int | None = 9, tune_from_epoch: int = 0, encoder_lr_factor: float = 0.001,
                 incremental_tuning: Literal["none", "classifier", "pet", "classifier+pet"] = "classifier",
                 incremental_lr_factor: float = 0.001, prototype_init: bool = True, lr: float = 0.1,
                 weight_decay: float = 5e-4, nesterov: bool = True, ema_decay: float | None = None, **base):
        if incremental_tuning not in ("none", "classifier", "pet", "classifier+pet"):
            raise ValueError(f"incremental_tuning must be none, classifier, pet or classifier+pet, got {incremental_tuning!r}")
        if "pet" in incremental_tuning and lora_rank == 0:
            raise ValueError(f"incremental_tuning={incremental_tuning!r} tunes LoRA, but lora_rank is 0")
        network = FSCITNetwork(backbone, num_classes, projection_layers, projection_dim, classifier_bias)
        super().__init__(network, lr=lr, weight_decay=weight_decay, nesterov=nesterov, ema_decay=ema_decay, **base)
        self.num_classes, self.temperature, self.teacher_momentum = num_classes, temperature, teacher_momentum
        self.ce_weight, self.supcon_weight, self.consistency_weight = ce_weight, supcon_weight, consistency_weight
        self.tune_from_block, self.tune_from_epoch, self.encoder_lr_factor = tune_from_block, tune_from_epoch, encoder_lr_factor
        self.incremental_tuning, self.incremental_lr_factor = incremental_tuning, incremental_lr_factor
        self.prototype_init = prototype_init
        # the teacher and the pretrained network are copies taken BEFORE the adapters exist: they have none
        self.teacher = EMATeacher(network)
        self.pretrained = Frozen(network)
        if lora_rank:
            from peft import LoraConfig, inject_adapter_in_model

            config = LoraConfig(r=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout, bias="none",
                                target_modules=list(lora_targets), layers_to_transform=lora_blocks,
                                layers_pattern="blocks" if lora_blocks is not None else None)
            inject_adapter_in_model(config, network.backbone)
        # the base session's student and teacher, written at the first incremental step (placeholders until then)
        self.base_student, self.base_teacher = Frozen(network), Frozen(self.teacher.module)
        self.session_acc: dict[int, float] = {}
        self.val_acc, self.val_base_acc, self.val_new_acc = MeanMetric(), MeanMetric(), MeanMetric()
        self._started_session = -1
        self.set_trainable(session=0, epoch=0)

    # ------------------------------------------------------------------ parameters
    def named_groups(self) -> dict[str, list[str]]:
        """Student parameter names: ``lora`` adapters, ``heads`` (projector + classifier), ``encoder`` (the
        pretrained backbone weights) and ``tuned_encoder``, the encoder part controlled fine-tuning unfreezes: in
        order, everything from block ``tune_from_block`` on (official: from the first name of that layer on)."""
        groups = {"lora": [], "heads": [], "encoder": [], "tuned_encoder": []}
        tuning = self.tune_from_block == -1
        for name, _ in self.network.named_parameters():
            if "lora_" in name:
                groups["lora"].append(name)
            elif not name.startswith("backbone."):
                groups["heads"].append(name)
            else:
                groups["encoder"].append(name)
                block = re.search(r"\.blocks\.(\d+)\.", name)
                tuning = tuning or (self.tune_from_block is not None and block is not None
                                    and int(block.group(1)) == self.tune_from_block)
                if tuning:
                    groups["tuned_encoder"].append(name)
        return groups

    def set_trainable(self, session: int, epoch: int) -> None:
        """What the student trains now (official ``adjust_learnable_parameters``); a function of the position."""
        groups = self.named_groups()
        if session == 0:
            names = groups["lora"] + groups["heads"]
            if self.tune_from_block is not None and epoch >= self.tune_from_epoch:
                names += groups["tuned_encoder"]
        else:  # official: everything frozen, then the ``incft_layers``
            names = []
            if "classifier" in self.incremental_tuning:
                names += [n for n in groups["heads"] if n.startswith("classifier.")]
            if "pet" in self.incremental_tuning:
                names += groups["lora"]
        chosen = set(names)
        for name, p in self.network.named_parameters():
            p.requires_grad_(name in chosen)

    def shared_weights(self) -> list[torch.Tensor]:
        """The student's weights that the teacher has too, in the teacher's order (the LoRA layers' base weights)."""
        student = {n.replace(".base_layer", ""): p for n, p in self.network.named_parameters() if "lora_" not in n}
        return [student[n] for n, _ in self.teacher.module.named_parameters()]

    def configure_optimizers(self):
        """Official ``params_with_lr``: adapters + heads at ``lr``, pretrained weights at ``lr * encoder_lr_factor``
        (only those unfrozen train), SGD with weight decay on all. The lr factor is a function of the epoch:
        per-epoch cosine over the base session (``CosineAnnealingLR(T_max=epochs_base)``), then
        ``incremental_lr_factor``."""
        params = dict(self.network.named_parameters())
        groups = self.named_groups()
        adapted = [params[n] for n in groups["lora"] + groups["heads"]]
        encoder = [params[n] for n in groups["encoder"]]
        groups = [{"params": adapted, "lr": self.lr}, {"params": encoder, "lr": self.lr * self.encoder_lr_factor}]
        if self.optimizer_name == "sgd":
            opt = torch.optim.SGD(groups, lr=self.lr, momentum=self.momentum, nesterov=self.nesterov,
                                  weight_decay=self.weight_decay)
        elif self.optimizer_name == "adamw":  # the CPU foundation's pre-training (a ViT from scratch)
            opt = torch.optim.AdamW(groups, lr=self.lr, weight_decay=self.weight_decay)
        else:
            raise ValueError(f"CoACT trains with optimizer sgd (official) or adamw, got {self.optimizer_name!r}")
        stream = self.trainer.datamodule

        def factor(step: int) -> float:
            epoch = step // stream.steps_per_epoch
            if stream.session_of_epoch(epoch) > 0:
                return self.incremental_lr_factor
            return 0.5 * (1 + math.cos(math.pi * epoch / stream.base_epochs))

        return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, factor),
                                                   "interval": "step"}}

    # ------------------------------------------------------------------ sessions
    def setup(self, stage: str) -> None:
        stream = self.trainer.datamodule
        if stream.num_classes != self.num_classes:
            raise ValueError(f"num_classes={self.num_classes}, but the session stream has {stream.num_classes} classes")

    @torch.no_grad()
    def write_prototypes(self, session: int) -> None:
        """Classifier rows of the session's classes <- mean student features of its K-shot images (eval mode,
        plain images: official ``replace_fc_with_prototypes``)."""
        images, labels = self.trainer.datamodule.support(session)
        was_training = self.network.training
        self.network.eval()
        features = torch.cat([self.network(chunk.to(self.device))[0].float() for chunk in images.split(256)])
        self.network.train(was_training)
        labels = labels.to(self.device)
        for c in labels.unique():
            self.network.classifier.weight[c] = features[labels == c].mean(0).to(self.network.classifier.weight.dtype)

    def on_train_epoch_start(self) -> None:
        stream, step = self.trainer.datamodule, self.global_step
        session = stream.session_of_step(step)
        if step == stream.session_start_step(session) and self._started_session != session:
            self._started_session = session
            if session == 1:  # the end of the base session: keep it, and start a new optimizer (fresh momentum)
                self.base_student.module.load_state_dict(self.network.state_dict())
                self.base_teacher.module.load_state_dict(self.teacher.module.state_dict())
                for optimizer in self.trainer.optimizers:
                    optimizer.state.clear()
            if session > 0 or self.prototype_init:
                self.write_prototypes(session)
        self.set_trainable(session, step // stream.steps_per_epoch)

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        session = self.trainer.datamodule.session_of_step(self.global_step)
        if session > 0 and self.incremental_tuning == "none":
            return None  # prototypes only: nothing to optimise (Lightning skips the step)
        query, key, labels = batch["view1"], batch["view2"], batch["label"]
        _, embedding, logits = self.network(query)
        self.teacher.update(self.shared_weights(), self.teacher_momentum)  # before the keys, as the official forward
        losses = {"ce": F.cross_entropy(logits.float(), labels)}  # float32 loss under bf16
        if self.supcon_weight:
            with torch.no_grad():
                teachers = [self.teacher] if session == 0 else [self.base_teacher, self.pretrained]
                keys = [teacher(key)[1] for teacher in teachers]
            views = F.normalize(torch.stack([embedding, *keys], dim=1).float(), dim=-1)
            losses["supcon"] = supcon_loss(views, labels, self.temperature)
        if session > 0 and self.consistency_weight:
            base_logits = self.base_student(query)[2]
            losses["consistency"] = consistency_loss(logits, base_logits)
        weights = {"ce": self.ce_weight, "supcon": self.supcon_weight, "consistency": self.consistency_weight}
        loss = sum(weights[k] * v for k, v in losses.items())
        self.log_dict({f"train/{k}": v.detach() for k, v in losses.items()}, prog_bar=False)
        self.log("train/loss", loss.detach(), prog_bar=True)
        self.log("train/session", float(session))
        return loss

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)[2]

    # ------------------------------------------------------------------ evaluation
    def validation_step(self, batch: dict, batch_idx: int) -> dict:
        """Accuracy over the classes seen so far (argmax over every classifier row, as the official ``test``),
        split into base and new classes."""
        labels = batch["label"]
        logits = self.network(batch["image"])[2]
        correct = (logits.argmax(1) == labels).float()
        is_base = labels < self.trainer.datamodule.base_classes
        self.val_acc.update(correct)
        self.val_base_acc.update(correct[is_base])
        self.val_new_acc.update(correct[~is_base])
        return {"preds": logits.argmax(1)}

    def on_validation_epoch_end(self) -> None:
        stream, step = self.trainer.datamodule, self.global_step
        session = stream.session_of_step(max(step - 1, 0))
        accuracy = float(self.val_acc.compute())
        self.log("val/acc", accuracy, prog_bar=True)
        self.log("val/base_acc", float(self.val_base_acc.compute()))
        if session > 0:
            self.log("val/new_acc", float(self.val_new_acc.compute()))
        session_end = (stream.session_start_step(session + 1) if session + 1 < stream.num_sessions
                       else stream.total_epochs * stream.steps_per_epoch)
        if step > 0 and step == session_end:  # the session's accuracy (official: after its last epoch)
            self.session_acc[session] = accuracy
        for s, value in sorted(self.session_acc.items()):
            self.log(f"val/session{s}_acc", value)
        if self.session_acc:
            self.log("val/avg_acc", sum(self.session_acc.values()) / len(self.session_acc))
        for metric in (self.val_acc, self.val_base_acc, self.val_new_acc):
            metric.reset()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["coact_session_acc"] = dict(self.session_acc)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.session_acc = dict(checkpoint.get("coact_session_acc", {}))
