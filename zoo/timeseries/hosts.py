"""The two training ends of a time-series SSL study: a representation learner validated by a linear probe on its
frozen features (a method extends :class:`RepresentationModule` with its ``training_step``), and the full
fine-tuning classifier (:class:`TimeSeriesClassifier`) that starts from such an encoder or from scratch."""
from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from zoo.core.module import ZooModule

from .encoder import TS2VecEncoder, max_pool_over_time
from .evaluation import classification_metrics, linear_probe

__all__ = ["RepresentationModule", "TimeSeriesClassifier", "load_encoder"]


def _gathered(module: ZooModule, outputs: list[dict]) -> dict[str, np.ndarray]:
    """One validation loader's outputs over all processes, each item once (a sharded loader pads the last shard)."""
    stacked = {k: torch.cat([o[k] for o in outputs]) for k in outputs[0]}
    if module.trainer.world_size > 1:
        stacked = {k: v.flatten(0, 1) for k, v in module.all_gather(stacked).items()}
    _, first = np.unique(stacked["idx"].cpu().numpy(), return_index=True)
    return {k: v.cpu().numpy()[first] for k, v in stacked.items()}


class RepresentationModule(ZooModule):
    """A self-supervised time-series encoder (``network``) whose validation is COMET's partial fine-tuning: a logistic
    regression on max-pooled frozen features of the labelled subset (validation loader 0), scored on the test set
    (loader 1). Features come from ``self.ema`` (the weight average) when the method keeps one."""

    expected_metrics = ("val/probe_accuracy", "val/probe_f1", "val/probe_auroc")

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        encoder = self.ema.module if self.ema is not None else self.network
        return max_pool_over_time(encoder(x, mask="all_true")).float()

    def on_validation_epoch_start(self) -> None:
        self._probe_outputs: dict[int, list[dict]] = {0: [], 1: []}

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._probe_outputs[dataloader_idx].append(
            {"idx": batch["idx"], "features": self.embed(batch["x"]), "label": batch["label"]})

    def on_validation_epoch_end(self) -> None:
        if not self._probe_outputs[1]:
            return
        train, test = (_gathered(self, self._probe_outputs[i]) for i in (0, 1))
        scores = linear_probe(train["features"], train["label"], test["features"], test["label"],
                              self.trainer.datamodule.num_classes)
        for name, value in scores.items():
            self.log(f"val/probe_{name}", value, rank_zero_only=False, sync_dist=False)


def load_encoder(network: nn.Module, checkpoint: str, prefix: str = "ema.module.") -> None:
    """Load an encoder from a zoo checkpoint: its weight average (``ema.module.*``) by default, as COMET fine-tunes
    the averaged ``self.net``; ``prefix="network."`` for the raw weights."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not weights:
        raise KeyError(f"no weights under {prefix!r} in {checkpoint}")
    network.load_state_dict(weights)


class TimeSeriesClassifier(ZooModule):
    """COMET's full fine-tuning (``tasks/fine_tuning.py`` with ``FTClassifier``): encoder, max-pool over time, a
    two-layer head (Linear 128, BatchNorm, ReLU, Linear, dropout 0.1 on the output: ``ProjectionHead``), cross-entropy,
    AdamW at 1e-4, constant rate. As officially, the encoder runs with its default mask (binomial) in training and
    unmasked in evaluation; the head returns logits (the official head applies a sigmoid first when there are two
    classes, then cross-entropy on those: see the COMET card). ``encoder_checkpoint`` starts from a pre-trained encoder (:func:`load_encoder`); ``None`` trains from
    scratch, the baseline. Logs ``val/accuracy``, ``val/f1``, ``val/auroc`` on the test set.
    """

    expected_metrics = ("val/accuracy", "val/f1", "val/auroc")

    def __init__(self, network: TS2VecEncoder, num_classes: int, encoder_checkpoint: str | None = None,
                 head_hidden: int = 128, head_dropout: float = 0.1,
                 optimizer: Literal["sgd", "adamw", "radam"] = "adamw", lr: float = 1e-4, weight_decay: float = 0.01,
                 lr_schedule: Literal["cosine", "constant"] = "constant", ema_decay: float | None = None, **base):
        super().__init__(network, optimizer=optimizer, lr=lr, weight_decay=weight_decay, lr_schedule=lr_schedule,
                         ema_decay=ema_decay, **base)
        if encoder_checkpoint:
            load_encoder(self.network, encoder_checkpoint)
        self.head = nn.Sequential(nn.Linear(network.output_dims, head_hidden), nn.BatchNorm1d(head_hidden), nn.ReLU(),
                                  nn.Linear(head_hidden, num_classes), nn.Dropout(head_dropout))
        self.num_classes = num_classes

    def logits(self, x: torch.Tensor, mask: str | None = None) -> torch.Tensor:
        return self.head(max_pool_over_time(self.network(x, mask)))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = F.cross_entropy(self.logits(batch["x"]).float(), batch["label"])
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def on_validation_epoch_start(self) -> None:
        self._test_outputs: list[dict] = []

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        probabilities = self.logits(batch["x"], mask="all_true").float().softmax(1)
        self._test_outputs.append({"idx": batch["idx"], "probabilities": probabilities, "label": batch["label"]})

    def on_validation_epoch_end(self) -> None:
        test = _gathered(self, self._test_outputs)
        for name, value in classification_metrics(test["probabilities"], test["label"]).items():
            self.log(f"val/{name}", value, rank_zero_only=False, sync_dist=False)
