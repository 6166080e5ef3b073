"""Semi-supervised data: a labeled and an unlabeled stream of fixed length per epoch.

Protocol (as in USB): every "epoch" is ``steps_per_epoch`` optimizer steps; each step draws ``batch_size``
labeled and ``uratio * batch_size`` unlabeled samples *in total over all ranks*, so the number of steps and the
global batch do not depend on the number of GPUs. The samplers shard each global batch across ranks themselves
(Lightning's sampler replacement is switched off by the CLI), reshuffle per epoch through ``set_epoch`` and
fast-forward on resume, so an interrupted run continues on exactly the batches it would have seen.
"""
from __future__ import annotations

import random
from typing import Iterator

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities.combined_loader import CombinedLoader
from torch.utils.data import DataLoader, Dataset, Sampler

from .datasets import ImageSet, load_image_set
from .views import Identity, StrongView, View, WeakView

__all__ = ["FixedLengthSampler", "ViewDataset", "SemiSupervisedDataModule", "sample_labeled_indices", "dist_info"]


def dist_info() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class FixedLengthSampler(Sampler):
    """Yields ``(index, augmentation_seed)`` pairs: this rank's share of ``samples_per_epoch`` global draws.

    Indices are concatenated random permutations of ``range(num_items)`` seeded by (seed, epoch); global batch
    ``t`` is ``draws[t*B:(t+1)*B]`` and rank ``r`` takes every ``world_size``-th element of it, so the ranks'
    shards of a step are disjoint and together form the same global batch for any world size.
    """

    def __init__(self, num_items: int, samples_per_epoch: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        if samples_per_epoch % world_size:
            raise ValueError(f"samples_per_epoch={samples_per_epoch} is not divisible by world_size={world_size}")
        self.num_items, self.samples_per_epoch, self.seed = num_items, samples_per_epoch, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def fast_forward(self, num_samples: int) -> None:
        """Skip this rank's first ``num_samples`` draws of the next epoch iterated (used once on resume)."""
        self._skip = num_samples

    def global_draws(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        reps = -(-self.samples_per_epoch // self.num_items)
        idx = torch.cat([torch.randperm(self.num_items, generator=g) for _ in range(reps)])[: self.samples_per_epoch]
        seeds = torch.randint(0, 2**62, (self.samples_per_epoch,), generator=g)
        return idx, seeds

    def __iter__(self) -> Iterator[tuple[int, int]]:
        idx, seeds = self.global_draws(self.epoch)
        idx, seeds = idx[self.rank :: self.world_size], seeds[self.rank :: self.world_size]
        skip, self._skip = self._skip, 0
        return iter(zip(idx[skip:].tolist(), seeds[skip:].tolist()))

    def __len__(self) -> int:
        return self.samples_per_epoch // self.world_size


class ViewDataset(Dataset):
    """Images and labels, returned as a dict holding each named view as a uint8 CHW tensor."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, views: dict[str, View]):
        self.images, self.labels, self.views = images, labels, views

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key) -> dict:
        index, seed = key if isinstance(key, tuple) else (key, key)
        rng = random.Random(seed)
        item = {"idx": index, "label": int(self.labels[index])}
        for name, view in self.views.items():
            item[name] = torch.from_numpy(np.array(view(self.images[index], rng), copy=True)).permute(2, 0, 1)
        return item


def sample_labeled_indices(labels: np.ndarray, num_labels: int, num_classes: int, seed: int) -> np.ndarray:
    """``num_labels / num_classes`` random indices per class (the standard balanced split)."""
    if num_labels % num_classes:
        raise ValueError(f"num_labels={num_labels} must be a multiple of the {num_classes} classes")
    rng = np.random.default_rng(seed)
    per_class = num_labels // num_classes
    chosen = [rng.choice(np.flatnonzero(labels == c), per_class, replace=False) for c in range(num_classes)]
    return np.sort(np.concatenate(chosen))


class SemiSupervisedDataModule(L.LightningDataModule):
    """Labeled + unlabeled training streams (``CombinedLoader({"lb", "ulb"})``) and the test set for evaluation.

    Args:
        dataset: one of ``zoo.core.datasets.IMAGE_SETS``.
        num_labels: labeled training images, balanced over classes, drawn with ``split_seed``.
        batch_size: global labeled batch per step (split across ranks).
        uratio: unlabeled batch = ``uratio * batch_size`` (FixMatch's mu). 0 trains on the labeled stream only.
        steps_per_epoch: optimizer steps per epoch (validation and checkpoint cadence).
        labeled_views / unlabeled_views: named views per stream; default weak / (weak, strong).
        include_labeled_in_unlabeled: the unlabeled stream draws from the whole training set (FixMatch, USB).
    """

    def __init__(self, dataset: str = "cifar10", num_labels: int = 40, batch_size: int = 64, uratio: int = 7,
                 steps_per_epoch: int = 1024, labeled_views: dict[str, View] | None = None,
                 unlabeled_views: dict[str, View] | None = None, include_labeled_in_unlabeled: bool = True,
                 eval_batch_size: int = 256, num_workers: int = 4, split_seed: int = 0, sampler_seed: int = 0,
                 download: bool = True, pin_memory: bool = True):
        super().__init__()
        self.dataset, self.num_labels, self.batch_size, self.uratio = dataset, num_labels, batch_size, uratio
        self.steps_per_epoch, self.include_labeled_in_unlabeled = steps_per_epoch, include_labeled_in_unlabeled
        self.labeled_views = labeled_views if labeled_views is not None else {"weak": WeakView()}
        self.unlabeled_views = (unlabeled_views if unlabeled_views is not None
                                else {"weak": WeakView(), "strong": StrongView()})
        self.eval_batch_size, self.num_workers = eval_batch_size, num_workers
        self.split_seed, self.sampler_seed, self.download, self.pin_memory = split_seed, sampler_seed, download, pin_memory
        self.data: ImageSet | None = None

    # ------------------------------------------------------------------ setup
    def prepare_data(self) -> None:
        load_image_set(self.dataset, download=self.download)  # downloads once, on one process per node

    def setup(self, stage: str | None = None) -> None:
        if self.data is not None:
            return
        self.data = load_image_set(self.dataset, download=self.download)
        self.labeled_idx = sample_labeled_indices(self.data.y_train, self.num_labels, self.data.num_classes,
                                                  self.split_seed)
        self.unlabeled_idx = (np.arange(len(self.data.y_train)) if self.include_labeled_in_unlabeled
                              else np.setdiff1d(np.arange(len(self.data.y_train)), self.labeled_idx))
        # normalisation constants on the 0..255 scale, applied on the device
        self.mean = torch.tensor(self.data.mean).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(self.data.std).view(1, -1, 1, 1) * 255

    @property
    def num_classes(self) -> int:
        if self.data is None:
            self.setup()
        return self.data.num_classes

    # ------------------------------------------------------------- loaders
    def _world(self) -> tuple[int, int]:
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        return dist_info()

    def _stream(self, indices: np.ndarray, views: dict[str, View], global_batch: int, stream_seed: int,
                skip_steps: int) -> DataLoader:
        rank, world = self._world()
        if global_batch % world:
            raise ValueError(f"global batch {global_batch} is not divisible by {world} processes")
        ds = ViewDataset(self.data.x_train[indices], self.data.y_train[indices], views)
        sampler = FixedLengthSampler(len(ds), global_batch * self.steps_per_epoch,
                                     seed=self.sampler_seed * 2 + stream_seed, rank=rank, world_size=world)
        sampler.fast_forward(skip_steps * global_batch // world)
        return DataLoader(ds, batch_size=global_batch // world, sampler=sampler, drop_last=True,
                          num_workers=self.num_workers, pin_memory=self._pin(),
                          persistent_workers=self.num_workers > 0)

    def _pin(self) -> bool:
        return self.pin_memory and torch.cuda.is_available()

    def _steps_done_in_epoch(self) -> int:
        """Batches of the current epoch already trained on (non-zero only when resuming mid-epoch)."""
        if self.trainer is None:
            return 0
        return self.trainer.global_step * self.trainer.accumulate_grad_batches - \
            self.trainer.current_epoch * self.steps_per_epoch

    def train_dataloader(self):
        skip = self._steps_done_in_epoch()
        loaders = {"lb": self._stream(self.labeled_idx, self.labeled_views, self.batch_size, 0, skip)}
        if self.uratio > 0:
            loaders["ulb"] = self._stream(self.unlabeled_idx, self.unlabeled_views, self.batch_size * self.uratio,
                                          1, skip)
        return CombinedLoader(loaders, mode="min_size")

    def val_dataloader(self):
        ds = ViewDataset(self.data.x_test, self.data.y_test, {"image": Identity()})
        sampler = None
        if self._world()[1] > 1:
            sampler = torch.utils.data.DistributedSampler(ds, shuffle=False)
        return DataLoader(ds, batch_size=self.eval_batch_size, sampler=sampler, num_workers=self.num_workers,
                          pin_memory=self._pin(), persistent_workers=self.num_workers > 0)

    test_dataloader = val_dataloader

    # ----------------------------------------------------- on the device
    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Normalise every uint8 image tensor on the device (cheaper than in the workers)."""
        return _normalise(batch, self.mean, self.std)


def _normalise(batch, mean, std):
    if isinstance(batch, dict):
        return {k: _normalise(v, mean, std) for k, v in batch.items()}
    if isinstance(batch, torch.Tensor) and batch.dtype == torch.uint8 and batch.ndim == 4:
        mean, std = mean.to(batch.device), std.to(batch.device)
        return ((batch.float() - mean) / std).contiguous(memory_format=torch.channels_last)
    return batch
