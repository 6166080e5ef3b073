"""The self-supervised image protocol: one unlabeled multi-view training stream, and labeled evaluation splits.

- Training: ``batch_size`` images per step *over all processes* (the zoo's data contract, ``zoo/core/data.py``:
  a sharded, fixed-length, resumable stream), each served as a dict ``{"idx", "label", <view name>: uint8 CHW, ...}``
  with the views of a :class:`~zoo.ssl.views.MultiView`. The labels ride along for diagnostics and the online probe;
  no SSL loss reads them.
- Evaluation (``val_dataloader``, in the order of ``zoo.ssl.evaluation.EVAL_SPLITS``): the labeled train split
  un-augmented (the kNN bank and the probe's features; ``bank_size`` images, all by default) and the test split.
- Images stay uint8 until they reach the device, where they are normalised with the dataset's statistics.
"""
from __future__ import annotations

import numpy as np
import torch

from zoo.core.data import StreamDataModule, ViewDataset, normalise_images
from zoo.core.datasets import ImageSet, evaluation_images, load_image_set
from zoo.core.views import Identity

from .evaluation import EVAL_SPLITS
from .views import BYOLViews, MultiView

__all__ = ["SSLDataModule"]


class SSLDataModule(StreamDataModule):
    """Unlabeled multi-view stream over an image set's train split, plus the labeled bank and test splits.

    Args:
        dataset: one of ``zoo.core.datasets.IMAGE_SETS``.
        views: the named views of every training image (default: BYOL's pair, ``view1`` / ``view2``).
        batch_size: global number of images per step (each contributes every view), split across ranks.
        steps_per_epoch: steps per epoch (validation / checkpoint cadence); ``None``: one pass over the train split
            (``len // batch_size``).
        eval_batch_size: per-process batch of the evaluation loaders.
        bank_size: train images in the kNN bank, a fixed random subset drawn with ``bank_seed`` (``None``: all).
    """

    def __init__(self, dataset: str = "cifar10", views: MultiView | None = None, batch_size: int = 256,
                 steps_per_epoch: int | None = None, eval_batch_size: int = 256, bank_size: int | None = None,
                 bank_seed: int = 0, num_workers: int = 8, sampler_seed: int = 0, download: bool = True,
                 pin_memory: bool = True):
        super().__init__()
        self.dataset, self.views, self.batch_size = dataset, views if views is not None else BYOLViews(), batch_size
        self.requested_steps_per_epoch = steps_per_epoch
        self.eval_batch_size, self.bank_size, self.bank_seed = eval_batch_size, bank_size, bank_seed
        self.num_workers, self.sampler_seed, self.download, self.pin_memory = (num_workers, sampler_seed, download,
                                                                               pin_memory)
        self.data: ImageSet | None = None

    # ------------------------------------------------------------------ setup
    def prepare_data(self) -> None:
        load_image_set(self.dataset, download=self.download)  # downloads once, on one process per node

    def setup(self, stage: str | None = None) -> None:
        if self.data is not None:
            return
        self.data = load_image_set(self.dataset, download=self.download)
        num_train = len(self.data.y_train)
        if self.batch_size > num_train:
            raise ValueError(f"batch_size={self.batch_size} exceeds the {num_train} training images of {self.dataset}")
        self.steps_per_epoch = self.requested_steps_per_epoch or num_train // self.batch_size
        if self.bank_size is None or self.bank_size >= num_train:
            self.bank_idx = np.arange(num_train)
        else:
            rng = np.random.default_rng(self.bank_seed)
            self.bank_idx = np.sort(rng.choice(num_train, self.bank_size, replace=False))
        # normalisation constants on the 0..255 scale, applied on the device
        self.mean = torch.tensor(self.data.mean).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(self.data.std).view(1, -1, 1, 1) * 255

    @property
    def num_classes(self) -> int:
        if self.data is None:
            self.setup()
        return self.data.num_classes

    # ------------------------------------------------------------- loaders
    def train_dataloader(self):
        dataset = ViewDataset(self.data.x_train, self.data.y_train, self.views.named_views())
        return self.stream(dataset, self.batch_size, seed=self.sampler_seed)

    def val_dataloader(self):
        # evaluation_images: lazily decoded folders (ImageNet) as fixed-size centre crops; arrays unchanged
        splits = {"bank": (evaluation_images(self.data.x_train)[self.bank_idx], self.data.y_train[self.bank_idx]),
                  "test": (evaluation_images(self.data.x_test), self.data.y_test)}
        return [self.eval_loader(ViewDataset(*splits[name], {"image": Identity()}), self.eval_batch_size)
                for name in EVAL_SPLITS]

    # ----------------------------------------------------- on the device
    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Normalise every uint8 image tensor on the device (cheaper than in the workers)."""
        return normalise_images(batch, self.mean, self.std)
