"""What ERM, ERM + Tent and ITTA share: DomainBed's optimiser defaults and the leave-one-domain-out evaluation.

Every evaluation scores the held-out domain (``val/acc``) and the training domains' validation split
(``val/source_acc``) twice: with the network as trained, and with the method's test-time adaptation
(``val/tta_acc``, ``val/source_tta_acc``): Tent for ERM, the adaptive-parameter step for ITTA. The adaptation
starts afresh at the first batch of each evaluation set and runs on through its batches, one step per batch.

Model selection is DomainBed's *training-domain validation*: ``val/selected_acc`` (``val/selected_tta_acc``) is
the held-out accuracy at the evaluation whose training-domain validation accuracy (without adaptation) is the
best so far; the last evaluation of a run gives its selected number.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from zoo.core.metrics import accuracy
from zoo.core.module import ZooModule

__all__ = ["DomainGeneralizationModule"]

SPLITS = ("", "source_")  # dataloader 0: the held-out domain; dataloader 1: the training domains' validation split


class DomainGeneralizationModule(ZooModule):
    """Base of the PACS leave-one-domain-out methods. Subclasses implement ``training_step``,
    :meth:`reset_adaptation` and :meth:`adapted_logits`.

    Defaults changed from :class:`ZooModule` (DomainBed's ``hparams_registry``): Adam (``adamw`` with
    ``weight_decay=0`` is Adam), lr 5e-5, constant learning rate, no EMA.
    """

    def __init__(self, network: nn.Module, optimizer: str = "adamw", lr: float = 5e-5, weight_decay: float = 0.0,
                 lr_schedule: str = "constant", ema_decay: float | None = None, **base):
        super().__init__(network, optimizer=optimizer, lr=lr, weight_decay=weight_decay, lr_schedule=lr_schedule,
                         ema_decay=ema_decay, **base)
        num_classes = network.classifier.out_features
        self.val_metrics = nn.ModuleDict({f"{split}{kind}": accuracy(num_classes)
                                          for split in SPLITS for kind in ("acc", "tta_acc")})
        # DomainBed's training-domain validation, kept in the checkpoint
        self.register_buffer("best_source_acc", torch.tensor(-1.0))
        self.register_buffer("selected_acc", torch.tensor(0.0))
        self.register_buffer("selected_tta_acc", torch.tensor(0.0))

    def setup(self, stage: str) -> None:  # the metrics are built above, per evaluation set
        pass

    def trainable_modules(self) -> nn.Module:
        return self.network

    # ------------------------------------------------------------- test-time adaptation
    def reset_adaptation(self) -> None:
        """Start the test-time adaptation afresh (before the first batch of every evaluation set)."""
        raise NotImplementedError

    def adapted_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The test-time adaptation step on batch ``x`` and the predictions it gives (float32 logits)."""
        raise NotImplementedError

    # -------------------------------------------------------------------- evaluation
    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        split = SPLITS[dataloader_idx]
        x, y = batch["image"], batch["label"]
        logits = self.network(x)
        self.val_metrics[f"{split}acc"](logits, y)
        # Lightning evaluates under inference mode; adaptation needs gradients and normal tensors (a copy of the batch)
        with torch.inference_mode(False), torch.enable_grad():
            if batch_idx == 0:
                self.reset_adaptation()
            adapted = self.adapted_logits(x.clone())
        self.val_metrics[f"{split}tta_acc"](adapted, y)
        for kind in ("acc", "tta_acc"):
            self.log(f"val/{split}{kind}", self.val_metrics[f"{split}{kind}"], on_epoch=True,
                     add_dataloader_idx=False, prog_bar=not split)
        return {"preds": adapted.argmax(1)}

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        source_acc = self.val_metrics["source_acc"].compute()
        if source_acc > self.best_source_acc:
            self.best_source_acc.fill_(source_acc)
            self.selected_acc.fill_(self.val_metrics["acc"].compute())
            self.selected_tta_acc.fill_(self.val_metrics["tta_acc"].compute())
        self.log("val/selected_acc", self.selected_acc)
        self.log("val/selected_tta_acc", self.selected_tta_acc)
