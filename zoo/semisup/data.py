"""The semi-supervised image protocol: a labeled and an unlabeled stream of fixed length per epoch.

Protocol (as in USB): every "epoch" is ``steps_per_epoch`` optimizer steps; each step draws ``batch_size``
labeled and ``uratio * batch_size`` unlabeled samples *in total over all ranks*, so the number of steps and the
global batch do not depend on the number of GPUs. The streams follow the zoo's one data contract
(``zoo.core.data``): sharded fixed-length samplers reseeded per epoch that fast-forward on resume.
"""
from __future__ import annotations

import numpy as np
import torch
from lightning.pytorch.utilities.combined_loader import CombinedLoader

from zoo.core.data import StreamDataModule, ViewDataset, normalise_images
from zoo.core.datasets import ImageSet, load_image_set
from zoo.core.views import Identity, StrongView, View, WeakView

__all__ = ["SemiSupervisedDataModule", "sample_labeled_indices"]


def sample_labeled_indices(labels: np.ndarray, num_labels: int, num_classes: int, seed: int) -> np.ndarray:
    """``num_labels / num_classes`` random indices per class (the standard balanced split)."""
    if num_labels % num_classes:
        raise ValueError(f"num_labels={num_labels} must be a multiple of the {num_classes} classes")
    rng = np.random.default_rng(seed)
    per_class = num_labels // num_classes
    chosen = [rng.choice(np.flatnonzero(labels == c), per_class, replace=False) for c in range(num_classes)]
    return np.sort(np.concatenate(chosen))


class SemiSupervisedDataModule(StreamDataModule):
    """Labeled + unlabeled training streams (``CombinedLoader({"lb", "ulb"})``) and the test set for evaluation.

    Args:
        dataset: one of ``zoo.core.datasets.IMAGE_SETS``.
        num_labels: labeled training images, balanced over classes, drawn with ``split_seed``; ``None`` labels every
            training image (fully supervised training, e.g. SLA).
        batch_size: global labeled batch per step (split across ranks).
        uratio: unlabeled batch = ``uratio * batch_size`` (FixMatch's mu). 0 trains on the labeled stream only.
        steps_per_epoch: optimizer steps per epoch (validation and checkpoint cadence).
        labeled_views / unlabeled_views: named views per stream; default weak / (weak, strong).
        include_labeled_in_unlabeled: the unlabeled stream draws from the whole training set (FixMatch, USB).
    """

    def __init__(self, dataset: str = "cifar10", num_labels: int | None = 40, batch_size: int = 64, uratio: int = 7,
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
        self.labeled_idx = (np.arange(len(self.data.y_train)) if self.num_labels is None else
                            sample_labeled_indices(self.data.y_train, self.num_labels, self.data.num_classes,
                                                   self.split_seed))
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
    def _train_set(self, indices: np.ndarray, views: dict[str, View]) -> ViewDataset:
        return ViewDataset(self.data.x_train[indices], self.data.y_train[indices], views)

    def train_dataloader(self):
        loaders = {"lb": self.stream(self._train_set(self.labeled_idx, self.labeled_views), self.batch_size,
                                     seed=self.sampler_seed * 2)}
        if self.uratio > 0:
            loaders["ulb"] = self.stream(self._train_set(self.unlabeled_idx, self.unlabeled_views),
                                         self.batch_size * self.uratio, seed=self.sampler_seed * 2 + 1)
        return CombinedLoader(loaders, mode="min_size")

    def val_dataloader(self):
        return self.eval_loader(ViewDataset(self.data.x_test, self.data.y_test, {"image": Identity()}),
                                self.eval_batch_size)

    test_dataloader = val_dataloader

    # ----------------------------------------------------- on the device
    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Normalise every uint8 image tensor on the device (cheaper than in the workers)."""
        return normalise_images(batch, self.mean, self.std)


