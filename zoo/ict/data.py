"""Unconditional images in [-1, 1] for generative training: one training stream and a fixed evaluation set.

Training draws ``batch_size`` images per step (global over ranks) through the zoo's ``FixedLengthSampler``, so the
step count, the global batch and the resume position do not depend on the number of GPUs or workers. Images stay
uint8 until they reach the device, where they become ``x / 127.5 - 1``. Labels are carried but never used.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader

from zoo.core.data import StreamDataModule, ViewDataset
from zoo.core.datasets import ImageSet, load_image_set
from zoo.core.views import Identity, WeakView

__all__ = ["ImageDataModule"]


class ImageDataModule(StreamDataModule):
    """Args:
        dataset: one of ``zoo.core.datasets.IMAGE_SETS`` (``cifar10``, ``cifar10_subset``, ``mnist``, ...).
        batch_size: global training batch per step.
        eval_batch_size: evaluation batch (real images; as many samples are generated per batch).
        eval_size: the first this many test images are the evaluation set (``None``: all).
        steps_per_epoch: optimizer steps per epoch.
        random_flip: horizontal flips in training (CIFAR-10, as in the CM code); off for digits.
        grayscale: keep one channel (MNIST is stored as RGB).
        pad_to: zero-pad to this side (MNIST 28 -> 32).
    """

    def __init__(self, dataset: str = "cifar10", batch_size: int = 1024, eval_batch_size: int = 500,
                 eval_size: int | None = 10000, steps_per_epoch: int = 1000, random_flip: bool = True,
                 grayscale: bool = False, pad_to: int | None = None, num_workers: int = 4, sampler_seed: int = 0,
                 download: bool = True, pin_memory: bool = True):
        super().__init__()
        self.dataset, self.batch_size, self.steps_per_epoch = dataset, batch_size, steps_per_epoch
        self.eval_batch_size, self.eval_size = eval_batch_size, eval_size
        self.random_flip, self.grayscale, self.pad_to = random_flip, grayscale, pad_to
        self.num_workers, self.sampler_seed = num_workers, sampler_seed
        self.download, self.pin_memory = download, pin_memory
        self._images: dict[str, np.ndarray] | None = None

    # ------------------------------------------------------------------ data
    def _prepare(self, x: np.ndarray) -> np.ndarray:
        if self.grayscale:
            x = x[..., :1]
        if self.pad_to is not None:
            top, left = (self.pad_to - x.shape[1]) // 2, (self.pad_to - x.shape[2]) // 2
            if top < 0 or left < 0:
                raise ValueError(f"pad_to={self.pad_to} is smaller than the images ({x.shape[1]}x{x.shape[2]})")
            x = np.pad(x, ((0, 0), (top, self.pad_to - x.shape[1] - top), (left, self.pad_to - x.shape[2] - left),
                           (0, 0)))
        return np.ascontiguousarray(x)

    def images(self, split: str) -> np.ndarray:
        """uint8 (N, H, W, C) images of ``train`` or ``eval`` after grayscale / padding."""
        if self._images is None:
            data: ImageSet = load_image_set(self.dataset, download=self.download)
            self._images = {"train": self._prepare(data.x_train), "eval": self._prepare(data.x_test[: self.eval_size]),
                            "train_labels": data.y_train, "eval_labels": data.y_test[: self.eval_size]}
        return self._images[split]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        _, h, w, c = self.images("train").shape
        return c, h, w

    def prepare_data(self) -> None:
        load_image_set(self.dataset, download=self.download)  # downloads once, on one process per node

    def setup(self, stage: str | None = None) -> None:
        self.images("train")

    # ------------------------------------------------------------------ loaders
    def train_dataloader(self) -> DataLoader:
        view = WeakView(pad_fraction=0.0, flip=True) if self.random_flip else Identity()
        dataset = ViewDataset(self.images("train"), self.images("train_labels"), {"image": view})
        return self.stream(dataset, self.batch_size, self.sampler_seed)

    def val_dataloader(self) -> DataLoader:
        dataset = ViewDataset(self.images("eval"), self.images("eval_labels"), {"image": Identity()})
        return self.eval_loader(dataset, self.eval_batch_size)

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """uint8 -> float in [-1, 1], on the device."""
        return {**batch, "image": batch["image"].float() / 127.5 - 1.0}
