"""COMET: Contrast Everything, a hierarchical contrastive framework for medical time series (Wang, Han, Wang and Zhang,
NeurIPS 2023; https://arxiv.org/abs/2310.14017). Official code: https://github.com/DL4mHealth/COMET (``comet.py``).

One optimizer step: for every level with a non-zero weight, two forward passes of the batch through the TS2Vec
encoder with that level's mask give two views, and that level's loss of them is added with its weight:

    L = w_patient L_patient + w_trial L_trial + w_sample L_sample + w_observation L_observation

(0.25 each in the paper and for AD; PTB's config uses 0.1 / 0.7 / 0.1 / 0.1). A level with weight 0 is switched off,
no forward passes (as the official ``factors[k] != 0`` branches). The evaluated encoder is the running *equal-weight
average* of every iterate since initialisation (``torch.optim.swa_utils.AveragedModel``, updated after each step),
kept here as the base's ``ema`` teacher with decay ``n / (n + 1)`` at its n-th update.
"""
from __future__ import annotations

from typing import Literal

import torch

from zoo.timeseries.encoder import TS2VecEncoder
from zoo.timeseries.hosts import RepresentationModule

from .losses import hierarchical, id_loss, observation_loss, sample_loss

__all__ = ["COMET"]

Mask = Literal["all_true", "continuous", "binomial"]


class COMET(RepresentationModule):
    """Args (defaults from ``config_files/AD_Configs.py`` and ``comet.py`` unless said):
        network: the TS2Vec encoder (output 320, hidden 64, depth 10).
        patient_weight, trial_weight, sample_weight, observation_weight: the level weights (``factors``), 0.25 each.
            A data set without patient / trial ids needs weight 0 there (it fails otherwise, naming the missing ids).
        patient_mask, trial_mask, sample_mask, observation_mask: the masks of each level's views (``masks``):
            no masking for patient and trial, TS2Vec's continuous masking for sample and observation.
        temperature: of the trial/patient losses, 0.1 (hard-coded officially).
        weight_averaging: keep the running average of all iterates (``AveragedModel``) and evaluate it.
        optimizer, lr, weight_decay, lr_schedule: AdamW at 1e-4 (``pretrain_lr``) with torch's default weight decay
            0.01 (not applied to biases here, the base's rule), constant rate.
    """

    def __init__(self, network: TS2VecEncoder, patient_weight: float = 0.25, trial_weight: float = 0.25,
                 sample_weight: float = 0.25, observation_weight: float = 0.25, patient_mask: Mask = "all_true",
                 trial_mask: Mask = "all_true", sample_mask: Mask = "continuous", observation_mask: Mask = "continuous",
                 temperature: float = 0.1, weight_averaging: bool = True,
                 optimizer: Literal["sgd", "adamw", "radam"] = "adamw", lr: float = 1e-4, weight_decay: float = 0.01,
                 lr_schedule: Literal["cosine", "constant"] = "constant", **base):
        super().__init__(network, optimizer=optimizer, lr=lr, weight_decay=weight_decay, lr_schedule=lr_schedule,
                         ema_decay=1.0 if weight_averaging else None, **base)
        self.weights = {"patient": patient_weight, "trial": trial_weight, "sample": sample_weight,
                        "observation": observation_weight}
        self.masks = {"patient": patient_mask, "trial": trial_mask, "sample": sample_mask,
                      "observation": observation_mask}
        self.temperature = temperature

    def ema_decay_at(self, step: int) -> float:
        """The equal-weight average of the initial weights and the ``step + 1`` iterates so far."""
        return (step + 1) / (step + 2)

    def level_loss(self, level: str, z1: torch.Tensor, z2: torch.Tensor, batch: dict) -> torch.Tensor:
        if level in ("patient", "trial"):
            if level not in batch:
                raise ValueError(f"the {level}-level loss needs {level} ids, which this data set does not have; "
                                 f"set {level}_weight: 0")
            return id_loss(z1, z2, batch[level], self.temperature)
        return hierarchical(sample_loss if level == "sample" else observation_loss, z1, z2)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        x, total = batch["x"], 0.0
        for level, weight in self.weights.items():
            if weight == 0:
                continue
            # the two views of a level: two passes with independently drawn masks (and dropout); losses in float32
            z1, z2 = self.network(x, self.masks[level]).float(), self.network(x, self.masks[level]).float()
            loss = self.level_loss(level, z1, z2, batch)
            self.log(f"train/{level}_loss", loss)
            total = total + weight * loss
        self.log("train/loss", total, prog_bar=True)
        return total
