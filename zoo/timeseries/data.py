"""The time-series stream on the zoo's data contract.

Batches are ``{"idx", "x" (B, C, L), "label"}`` plus ``"patient"`` and ``"trial"`` where the set has those ids (the
keys are absent otherwise: nothing is invented). COMET needs several windows of one trial / patient in a batch for
its trial- and patient-level positives; :class:`GroupedSampler` draws an epoch the way its ``trial`` shuffle orders
the data (``utils.trial_shuffle_feature_label``): groups in random order, each group's windows contiguous and in
random order, cut into consecutive batches.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from zoo.core.data import FixedLengthSampler, StreamDataModule

from .datasets import TimeSeriesSet, load_timeseries

__all__ = ["GroupedSampler", "TimeSeriesDataModule", "Windows", "label_subset"]


def label_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Indices of the labelled ``fraction`` of a training set: per class, a seeded random ``round(fraction * n_c)``
    windows and at least one (COMET takes the first ``int(N * fraction)`` of its shuffled set, which at 1 % of a
    UCR set is a single window of one class, leaving nothing a classifier could be fit on)."""
    rng = np.random.default_rng(seed)
    chosen = [rng.permutation(np.flatnonzero(labels == c))[: max(1, round(fraction * np.sum(labels == c)))]
              for c in np.unique(labels)]
    return np.sort(np.concatenate(chosen))


class Windows(Dataset):
    """Windows ``(N, C, L)`` with their labels and, when given, patient and trial ids."""

    def __init__(self, x: np.ndarray, labels: np.ndarray, ids: dict[str, np.ndarray] | None = None):
        self.x = torch.from_numpy(np.ascontiguousarray(x, np.float32))
        self.labels = torch.from_numpy(labels.astype(np.int64))
        self.ids = {k: torch.from_numpy(v.astype(np.int64)) for k, v in (ids or {}).items()}

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key) -> dict:
        index = key[0] if isinstance(key, tuple) else key  # FixedLengthSampler yields (index, augmentation seed)
        return {"idx": index, "x": self.x[index], "label": self.labels[index],
                **{name: ids[index] for name, ids in self.ids.items()}}


class GroupedSampler(FixedLengthSampler):
    """COMET's ``trial`` shuffle, redrawn each epoch from (seed, epoch): the groups (trials or patients) in random
    order, each group's items contiguous and shuffled within, concatenated (and repeated to fill the epoch). Each
    rank takes its strided share of every global batch, as in :class:`FixedLengthSampler`."""

    def __init__(self, groups: np.ndarray, samples_per_epoch: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        super().__init__(len(groups), samples_per_epoch, seed, rank, world_size)
        self.members = [torch.from_numpy(np.flatnonzero(groups == g)) for g in np.unique(groups)]

    def global_draws(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        reps = -(-self.samples_per_epoch // self.num_items)
        passes = []
        for _ in range(reps):
            order = torch.randperm(len(self.members), generator=g).tolist()
            passes += [self.members[i][torch.randperm(len(self.members[i]), generator=g)] for i in order]
        idx = torch.cat(passes)[: self.samples_per_epoch]
        seeds = torch.randint(0, 2**62, (self.samples_per_epoch,), generator=g)
        return idx, seeds


class TimeSeriesDataModule(StreamDataModule):
    """A time-series set's training stream and its evaluation loaders.

    Args:
        dataset: a name of :func:`~zoo.timeseries.datasets.load_timeseries`.
        batch_size: global training batch (COMET pre-trains with 256 and fine-tunes with 128).
        group_by: ``trial`` / ``patient``: batches follow :class:`GroupedSampler` over that level's ids (COMET's
            ``trial`` shuffle); ``none``: uniform draws (the official ``random`` shuffle, and the only choice on a
            set without trials or patients).
        train_on: ``all`` training windows (self-supervised pre-training, labels unused) or only the ``labeled``
            fraction (fine-tuning).
        label_fraction, label_seed: the labelled subset (:func:`label_subset`): 1.0, 0.1, 0.01 in COMET.
        probe: validation also encodes the labelled subset, as loader 0 before the test set (loader 1), for a
            linear probe on frozen features; otherwise the test set is the only validation loader.
        steps_per_epoch: default one pass over the training windows.
    """

    def __init__(self, dataset: str = "ECG200", batch_size: int = 256,
                 group_by: Literal["trial", "patient", "none"] = "none", train_on: Literal["all", "labeled"] = "all",
                 label_fraction: float = 1.0, label_seed: int = 0, probe: bool = True, eval_batch_size: int = 256,
                 steps_per_epoch: int | None = None, seed: int = 0, num_workers: int = 0):
        super().__init__()
        self.dataset, self.batch_size, self.group_by, self.train_on = dataset, batch_size, group_by, train_on
        self.label_fraction, self.label_seed, self.probe = label_fraction, label_seed, probe
        self.eval_batch_size, self.seed, self.num_workers = eval_batch_size, seed, num_workers
        self._steps_per_epoch = steps_per_epoch
        self.data: TimeSeriesSet | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.data is not None:
            return
        self.data = data = load_timeseries(self.dataset)
        self.num_classes, self.input_dims = data.num_classes, data.x_train.shape[1]
        ids = {level: getattr(data, f"{level}_train") for level in ("patient", "trial")}
        ids = {level: values for level, values in ids.items() if values is not None}
        if self.group_by != "none" and self.group_by not in ids:
            raise ValueError(f"{self.dataset} has no {self.group_by} ids (its levels: {', '.join(data.levels)}); "
                             "use group_by=none")
        self.labeled = label_subset(data.y_train, self.label_fraction, self.label_seed)
        train_items = self.labeled if self.train_on == "labeled" else np.arange(len(data.y_train))
        self.train_set = Windows(data.x_train[train_items], data.y_train[train_items],
                                 {level: values[train_items] for level, values in ids.items()})
        self.labeled_set = Windows(data.x_train[self.labeled], data.y_train[self.labeled])
        self.test_set = Windows(data.x_test, data.y_test)
        self.steps_per_epoch = self._steps_per_epoch or max(1, len(self.train_set) // self.batch_size)

    def train_dataloader(self):
        sampler = None
        if self.group_by != "none":
            rank, world = self.world()
            groups = self.train_set.ids[self.group_by].numpy()
            sampler = GroupedSampler(groups, self.batch_size * self.steps_per_epoch, self.seed, rank, world)
        return self.stream(self.train_set, self.batch_size, seed=self.seed, sampler=sampler)

    def val_dataloader(self):
        test = self.eval_loader(self.test_set, self.eval_batch_size)
        return [self.eval_loader(self.labeled_set, self.eval_batch_size), test] if self.probe else test
