"""Weak-to-Strong Generalization: Eliciting Strong Capabilities With Weak Supervision (Burns et al., 2023).

A weak supervisor, trained on ground truth, labels data for a stronger student. The question is how much of the gap
between the weak supervisor and a strong model trained on ground truth (the ceiling) the student recovers:

    PGR = (acc_weak_to_strong - acc_weak) / (acc_ceiling - acc_weak)

This module is one training run of any of the three roles (the data module decides ground truth or weak labels);
``zoo.weak_to_strong.pgr`` chains them. The student's loss is plain cross-entropy to the weak soft labels (``xent``),
the auxiliary confidence loss (``logconf``: CE to ``(1 - alpha) * weak + alpha * hardened student``, the student's
predictions hardened at a batch-adaptive threshold that reproduces the weak labels' class balance), or the
product-of-experts target (``product``). Model: a bias-free, zero-initialised 2-way linear head on the backbone's
hidden state at the last non-pad token.

Follows openai/weak-to-strong (``weak_to_strong/loss.py``, ``model.py``, ``train.py``, ``train_simple.py``): losses
over the whole batch (the confidence threshold over the global batch under data parallelism, via all-gather),
step_frac = step / total steps, dropout off during training (``train_with_dropout=False``),
Adam without weight decay at lr 5e-5 (gpt2 sizes), batch 32, 2 epochs, cosine decay to zero. Deliberate differences:
alpha warms up linearly over ``warmup_frac`` as the paper says (the code uses alpha = aux_coef * step_frac during the
warm-up, then jumps to aux_coef); the last non-pad token comes from the attention mask (the code counts non-zero ids,
which miscounts GPT-2's token 0, "!"); the decay is the base's ``cos(pi/2 * progress)`` rather than
``(1 + cos(pi * progress)) / 2``.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torchmetrics

from zoo.core.module import ZooModule
from zoo.lm.heads import logconf_loss, product_loss, xent_loss

__all__ = ["WeakToStrong"]


class WeakToStrong(ZooModule):
    """A classifier trained on ``batch["soft_label"]`` (ground truth one-hot, or the weak supervisor's soft labels).

    Args:
        network: a :class:`zoo.lm.heads.SequenceHead` with 2 outputs (zero-initialised head).
        loss: ``xent``, ``logconf`` (auxiliary confidence loss) or ``product``.
        aux_coef: alpha_max of ``logconf`` (code 0.5; the paper uses 0.75 at large compute gaps).
        warmup_frac: fraction of training over which alpha ramps up linearly (code 0.1; paper 0.2).
        product_alpha, product_beta: exponents of the weak and strong predictions in ``product``.
        train_with_dropout: the official code trains in eval mode (no dropout) "for determinism".
    """

    expected_metrics = ("val/acc", "train/loss", "train/label_agreement")

    def __init__(self, network: nn.Module, loss: Literal["xent", "logconf", "product"] = "xent",
                 aux_coef: float = 0.5, warmup_frac: float = 0.1, product_alpha: float = 1.0,
                 product_beta: float = 1.0, train_with_dropout: bool = False, optimizer: str = "adamw",
                 lr: float = 5e-5, weight_decay: float = 0.0, cosine_cycles: float = 0.5, **base):
        super().__init__(network, optimizer=optimizer, lr=lr, weight_decay=weight_decay, cosine_cycles=cosine_cycles,
                         ema_decay=None, **base)
        if loss not in ("xent", "logconf", "product"):
            raise ValueError(f"unknown loss {loss!r}; use xent, logconf or product")
        self.loss_name, self.aux_coef, self.warmup_frac = loss, aux_coef, warmup_frac
        self.product_alpha, self.product_beta = product_alpha, product_beta
        self.train_with_dropout = train_with_dropout
        self.val_acc = torchmetrics.classification.MulticlassAccuracy(num_classes=2, average="micro")

    def forward(self, batch: dict) -> torch.Tensor:
        return self.network(batch["input_ids"], batch["attention_mask"])

    def loss(self, logits: torch.Tensor, soft_labels: torch.Tensor, step_frac: float) -> torch.Tensor:
        if self.loss_name == "logconf":
            gather = (lambda t: self.all_gather(t).flatten(0, 1)) if self.trainer.world_size > 1 else None
            return logconf_loss(logits, soft_labels, step_frac, self.aux_coef, self.warmup_frac, gather)
        if self.loss_name == "product":
            return product_loss(logits, soft_labels, self.product_alpha, self.product_beta)
        return xent_loss(logits, soft_labels)

    def on_train_batch_start(self, batch, batch_idx) -> None:
        if not self.train_with_dropout:
            self.network.eval()  # Lightning switches to train mode each epoch; the official code never does

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits = self(batch)
        step_frac = self.global_step / max(1, int(self.trainer.estimated_stepping_batches))
        loss = self.loss(logits, batch["soft_label"], step_frac)
        preds = logits.argmax(-1)
        self.log_dict({"train/loss": loss,
                       "train/label_agreement": (preds == batch["soft_label"].argmax(-1)).float().mean(),
                       # ground truth of the training docs: a diagnostic only (half 2 never trains on it)
                       "train/gt_acc": (preds == batch["label"]).float().mean()})
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.val_acc(self(batch).argmax(-1), batch["label"])
        self.log("val/acc", self.val_acc, on_epoch=True, prog_bar=True)

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        """Soft labels (softmax) for the weak-to-strong transfer, with the docs' indices."""
        return {"idx": batch["idx"], "probs": torch.softmax(self(batch).float(), dim=-1)}
