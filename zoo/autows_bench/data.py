"""The end model's data: (input, soft label) of the covered train points, after LF synthesis + label model.

The weak labels are computed once per (dataset, labels, seed, settings) in :meth:`AutoWSDataModule.setup` -- the
protocol's step before training -- and kept in memory for the process (``functools.cache``).
"""
from __future__ import annotations

import functools
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from zoo.core.data import StreamDataModule

from .protocol import draw_labeled, load_autows_data, real_lf_weak_labels, synthesized_weak_labels

__all__ = ["AutoWSDataModule", "SoftLabelDataset", "weak_supervision_step"]


class SoftLabelDataset(Dataset):
    """Items ``{"idx", "features", "soft_label", "label"}``; ``label`` is the argmax (gold for evaluation sets)."""

    def __init__(self, inputs: np.ndarray, soft_labels: np.ndarray, labels: np.ndarray | None = None):
        self.inputs = torch.from_numpy(np.ascontiguousarray(inputs, np.float32))
        self.soft_labels = torch.from_numpy(np.ascontiguousarray(soft_labels, np.float32))
        self.labels = torch.from_numpy((soft_labels.argmax(1) if labels is None else labels).astype(np.int64))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key) -> dict:
        index = key[0] if isinstance(key, tuple) else key  # FixedLengthSampler yields (index, augmentation seed)
        return {"idx": index, "features": self.inputs[index], "soft_label": self.soft_labels[index],
                "label": self.labels[index]}


_load_autows_data = functools.cache(load_autows_data)  # one load per process for all arms and seeds


@functools.cache
def weak_supervision_step(dataset: str, supervision: str, num_labeled: int, seed: int, embedding_dim: int,
                          max_train: int | None, max_valid: int | None, snuba_iterations: int, snuba_cardinality: int):
    """(data, labeled indices, training inputs, soft labels, weak-label record or None) for one arm."""
    data = _load_autows_data(dataset, embedding_dim, max_train, max_valid, seed=0)
    labeled = draw_labeled(len(data.valid_y), num_labeled, seed)
    if supervision == "few_shot":
        one_hot = np.eye(data.num_classes, dtype=np.float32)[data.valid_y[labeled]]
        return data, labeled, data.valid_inputs[labeled], one_hot, None
    if supervision == "snuba":
        weak = synthesized_weak_labels(data, labeled, seed, iterations=snuba_iterations, cardinality=snuba_cardinality)
    else:
        weak = real_lf_weak_labels(data, labeled, seed)
    return data, labeled, data.train_inputs[weak.covered], weak.soft_labels, weak


class AutoWSDataModule(StreamDataModule):
    """Batches ``{"idx", "features", "soft_label", "label"}``; validation is the test split with gold labels.

    Args:
        dataset: ``mnist``, ``youtube``, ``sms``, ``trec``.
        supervision: ``snuba`` (synthesised LFs + label model), ``real_lfs`` (the dataset's own WRENCH LFs + the
            same label model) or ``few_shot`` (the labeled points alone, one-hot).
        num_labeled: labeled points drawn from the validation split (100, the paper's ``n_labeled_points``).
        seed: draw of the labeled points and label-model seed.
        embedding_dim: PCA width of the LF-synthesis features (100, ``PCA(n_components=100)`` in pipeline.py).
        max_train, max_valid: random subsets of the unlabeled train / validation pool (CPU settings; None = all).
        snuba_iterations, snuba_cardinality: 23 and 1 (pipeline.py defaults).
        batch_size: 256 (data_settings.py ``EndClassifierModel``), capped at the training-set size.
        steps_per_epoch: optimizer steps per epoch.
    """

    def __init__(self, dataset: str = "mnist", supervision: Literal["snuba", "real_lfs", "few_shot"] = "snuba",
                 num_labeled: int = 100, seed: int = 0, embedding_dim: int = 100, max_train: int | None = None,
                 max_valid: int | None = None, snuba_iterations: int = 23, snuba_cardinality: int = 1,
                 batch_size: int = 256, eval_batch_size: int = 512, steps_per_epoch: int = 100, num_workers: int = 0):
        super().__init__()
        self.dataset, self.supervision, self.num_labeled, self.seed = dataset, supervision, num_labeled, seed
        self.step_args = (dataset, supervision, num_labeled, seed, embedding_dim, max_train, max_valid,
                          snuba_iterations, snuba_cardinality)
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.steps_per_epoch, self.num_workers = steps_per_epoch, num_workers
        self.train_set = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        data, self.labeled, inputs, soft_labels, self.weak_labels = weak_supervision_step(*self.step_args)
        self.num_classes, self.input_shape = data.num_classes, inputs.shape[1:]
        self.train_set = SoftLabelDataset(inputs, soft_labels)
        self.test_set = SoftLabelDataset(data.test_inputs, np.eye(data.num_classes)[data.test_y], data.test_y)
        self.batch_size = min(self.batch_size, len(self.train_set))

    def train_dataloader(self):
        return self.stream(self.train_set, self.batch_size, seed=self.seed)

    def val_dataloader(self):
        return self.eval_loader(self.test_set, self.eval_batch_size)
