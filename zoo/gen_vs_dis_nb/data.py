"""One point of the paper's sweep as data: the m-sample training subsample ``(m, repeat)`` of a frozen-feature bank,
min-max scaled with its own range, and the whole test set scaled the same way.

The subsample is the one ``zoo.ssl.bank.sample_size_sweep`` draws for the same ``(sweep_seed, m, repeat)``, so a
Lightning run at one m sees exactly the data of the study's row for that m.
"""
from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from zoo.core.data import StreamDataModule
from zoo.ssl.bank import FeatureBank, draw_subsample, feature_bank, scale_on_subsample

__all__ = ["FeatureSubsetDataModule", "load_bank_source"]


def load_bank_source(source: str, dataset: str, layer: str = "backbone", encoder_seed: int = 0) -> FeatureBank:
    """``pixels`` (scikit-learn digits, 64 raw pixels), ``checkpoint:<path>`` (a zoo SSL run's checkpoint),
    ``init:<experiment file>`` (that experiment's module untrained, seeded with ``encoder_seed``) or
    ``encoder:<timm name>`` (random init with ``encoder_seed``)."""
    kind, _, value = source.partition(":")
    if kind == "pixels":
        if dataset != "digits":
            raise ValueError(f"source 'pixels' is scikit-learn's 8x8 digits; dataset must be 'digits', not {dataset!r}")
        from .study import digits_pixel_bank

        return digits_pixel_bank()
    if kind == "encoder" and value:
        return feature_bank(dataset, encoder=value, seed=encoder_seed, layer=layer)
    if kind == "checkpoint" and value:
        return feature_bank(dataset, checkpoint=value, layer=layer)
    if kind == "init" and value:
        return feature_bank(dataset, random_init=value, seed=encoder_seed, layer=layer)
    raise ValueError(f"unknown feature source {source!r}; use pixels, checkpoint:<path>, init:<experiment file> or "
                     "encoder:<timm name>")


class _Features(Dataset):
    def __init__(self, features: np.ndarray, labels: np.ndarray):
        self.features = torch.from_numpy(np.ascontiguousarray(features, np.float32))
        self.labels = torch.from_numpy(labels.astype(np.int64))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key):
        index = key[0] if isinstance(key, tuple) else key  # FixedLengthSampler yields (index, augmentation seed)
        return {"idx": index, "features": self.features[index], "label": self.labels[index]}


class FeatureSubsetDataModule(StreamDataModule):
    """Batches ``{"idx", "features", "label"}``.

    Args:
        source: where the features come from (see :func:`load_bank_source`).
        dataset: the image set of the bank.
        layer: ``backbone`` or ``projector`` for encoder/checkpoint sources.
        encoder_seed: initialisation seed of an ``encoder:`` source.
        m, repeat, sweep_seed: which subsample of the sweep (drawn until every class appears).
        batch_size: global training batch; the official SGD logistic regression uses 256 (capped at m).
        steps_per_epoch: default ceil(m / batch): one epoch is one pass over the subsample, as the official loader.
    """

    def __init__(self, source: str = "pixels", dataset: str = "digits", layer: Literal["backbone", "projector"] =
                 "backbone", encoder_seed: int = 0, m: int = 100, repeat: int = 0, sweep_seed: int = 0,
                 batch_size: int = 256, eval_batch_size: int = 1024, steps_per_epoch: int | None = None,
                 num_workers: int = 0):
        super().__init__()
        self.source, self.dataset, self.layer, self.encoder_seed = source, dataset, layer, encoder_seed
        self.m, self.repeat, self.sweep_seed = m, repeat, sweep_seed
        self.batch_size = min(batch_size, m)
        self.eval_batch_size, self.num_workers = eval_batch_size, num_workers
        self.steps_per_epoch = steps_per_epoch or math.ceil(m / self.batch_size)
        self.train_set = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        bank = load_bank_source(self.source, self.dataset, self.layer, self.encoder_seed)
        self.num_classes, self.num_features = bank.num_classes, bank.dim
        self.indices = draw_subsample(bank.train_labels, self.m, bank.num_classes,
                                      np.random.default_rng([self.sweep_seed, self.m, self.repeat]))
        train, test = scale_on_subsample(bank.train_features[self.indices], bank.test_features, "minmax")
        self.train_set = _Features(train, bank.train_labels[self.indices])
        self.test_set = _Features(test, bank.test_labels)

    def train_dataloader(self):
        return self.stream(self.train_set, self.batch_size, seed=self.sweep_seed)

    def val_dataloader(self):
        return self.eval_loader(self.test_set, self.eval_batch_size)
