"""The student's data: exactly the stored crops, several per image per load, with their stored labels.

As FKD's ``ImageFolder_FKD``, every load of an image draws ``num_crops`` different records of its store (without
replacement, from the augmentation seed the sampler gives that draw) and returns those crops: the stored box resized
to the store's crop size, flipped as stored. ``batch_size`` counts crops, as the official ``-b``: each step loads
``batch_size / num_crops`` images. FerKD's partition (:func:`zoo.ferkd.module.partition_crops`) is applied when the
store is read: discarded crops are never drawn, calibrated ones are flagged for the student.

A missing store, or one made for other images (its fingerprint of the training images and labels differs), stops
at setup with the command that makes the right one.
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import Dataset

from zoo.core.data import StreamDataModule, ViewDataset, normalise_images
from zoo.core.datasets import ImageSet, load_image_set
from zoo.core.views import Identity

from .module import CALIBRATE, DISCARD, partition_crops
from .store import build_store, crop_view, fingerprint, load_store

__all__ = ["SoftLabelDataModule", "StoredCrops", "collate_crops"]


class StoredCrops(Dataset):
    """Item ``(index, seed)``: ``num_crops`` stored crops of image ``index`` drawn with ``random.Random(seed)`` from
    its usable records, as a dict of per-crop tensors (``image`` uint8 ``(n, C, S, S)``, ``label``, ``crop``,
    ``soft_index``, ``soft_value``, ``calibrated``) and the image's ``idx``."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, store: dict, usable: torch.Tensor,
                 calibrated: torch.Tensor, num_crops: int, crop_size: int):
        self.images, self.labels, self.store = images, labels, store
        self.usable, self.calibrated, self.num_crops, self.crop_size = usable, calibrated, num_crops, crop_size

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key) -> dict:
        index, seed = key if isinstance(key, tuple) else (key, key)
        crops = self.usable[index, random.Random(seed).sample(range(self.usable.shape[1]), self.num_crops)]
        coords, flips = self.store["coords"][index, crops].numpy(), self.store["flips"][index, crops].tolist()
        return {"idx": index,
                "image": torch.stack([crop_view(self.images[index], c, f, self.crop_size) for c, f in zip(coords, flips)]),
                "label": torch.full((self.num_crops,), int(self.labels[index]), dtype=torch.long),
                "crop": crops,
                "soft_index": self.store["topk_index"][index, crops].long(),
                "soft_value": self.store["topk_value"][index, crops].float(),
                "calibrated": self.calibrated[index, crops]}


def collate_crops(items: list[dict]) -> dict:
    """An image-major batch: per-crop fields concatenated (rows ``i*n .. i*n+n-1`` are image i's crops), ``idx``
    one entry per image."""
    batch = {key: torch.cat([item[key] for item in items]) for key in items[0] if key != "idx"}
    batch["idx"] = torch.tensor([item["idx"] for item in items])
    return batch


class SoftLabelDataModule(StreamDataModule):
    """Stored crops of ``dataset``'s training images for the student, and its test set for evaluation.

    Args:
        store: the soft-label file made by ``python -m zoo.ferkd.generate`` for this dataset.
        num_crops: crops per image per load (official ``--num_crops 4``).
        batch_size: crops per step over all processes (official ``-b``); a multiple of ``num_crops``.
        discard_easiest / calibrate_hardest: FerKD's partition of each image's stored crops (fractions; 0 and 0
            give plain FKD: every crop, its teacher label).
        crop_size: the student's input size; default the store's (the size the teacher saw).
        generate_missing_with: a teacher network that makes a missing store in memory at setup (the offline
            stand-in for tests and the sweep, where no teacher run exists); by default a missing store is an error.
        standin_crops_per_image: records per image of that stand-in store.
    """

    def __init__(self, store: str, dataset: str = "cifar10_subset", num_crops: int = 4, batch_size: int = 1024,
                 discard_easiest: float = 0.1, calibrate_hardest: float = 0.1, crop_size: int | None = None,
                 steps_per_epoch: int = 1000, eval_batch_size: int = 256, num_workers: int = 4, sampler_seed: int = 0,
                 download: bool = True, pin_memory: bool = True, generate_missing_with: nn.Module | None = None,
                 standin_crops_per_image: int = 10):
        super().__init__()
        if num_crops < 1 or batch_size % num_crops:
            raise ValueError(f"batch_size={batch_size} (crops per step) must be a positive multiple of "
                             f"num_crops={num_crops}")
        self.store_path, self.dataset, self.num_crops, self.batch_size = store, dataset, num_crops, batch_size
        self.discard_easiest, self.calibrate_hardest, self.crop_size = discard_easiest, calibrate_hardest, crop_size
        self.steps_per_epoch, self.eval_batch_size, self.num_workers = steps_per_epoch, eval_batch_size, num_workers
        self.sampler_seed, self.download, self.pin_memory = sampler_seed, download, pin_memory
        self.generate_missing_with, self.standin_crops_per_image = generate_missing_with, standin_crops_per_image
        self.data: ImageSet | None = None

    # ------------------------------------------------------------------ setup
    def prepare_data(self) -> None:
        load_image_set(self.dataset, download=self.download)

    def setup(self, stage: str | None = None) -> None:
        if self.data is not None:
            return
        data = load_image_set(self.dataset, download=self.download)
        self.mean = torch.tensor(data.mean).view(1, -1, 1, 1) * 255  # 0..255 scale, applied on the device
        self.std = torch.tensor(data.std).view(1, -1, 1, 1) * 255
        self.store = self._read_store(data)
        kinds = partition_crops(self.store["gt_prob"], self.discard_easiest, self.calibrate_hardest)
        # every image keeps the same number of records (the fractions are per image): one (N, U) table of crop ids
        self.usable = torch.stack([torch.nonzero(row != DISCARD).flatten() for row in kinds])
        if self.usable.shape[1] < self.num_crops:
            raise ValueError(f"num_crops={self.num_crops} exceeds the {self.usable.shape[1]} usable crops per image "
                             f"of {self.store_path} after discarding the easiest {self.discard_easiest:.0%}")
        self.calibrated = kinds == CALIBRATE
        self.data = data

    def _read_store(self, data: ImageSet) -> dict:
        path = Path(self.store_path)
        if not path.exists():
            if self.generate_missing_with is None:
                raise FileNotFoundError(
                    f"soft-label store not found: {path.resolve()}\n  Train the teacher and label the crops first, "
                    f"e.g.\n    make train EXP=ferkd_cifar10_subset_teacher\n    python -m zoo.ferkd.generate "
                    f"--teacher runs/ferkd_cifar10_subset_teacher/checkpoints/last.ckpt --out {self.store_path}")
            return build_store(self.generate_missing_with, data.x_train, data.y_train, self.mean, self.std,
                               self.standin_crops_per_image, dataset=self.dataset)
        store = load_store(path)
        expected = (self.dataset, len(data.y_train), fingerprint(data.x_train, data.y_train))
        found = (store["dataset"], store["num_images"], store["fingerprint"])
        if found != expected:
            raise ValueError(f"{path} was made for other images (dataset {found[0]!r}, {found[1]} images, fingerprint "
                             f"{found[2][:12]}), not for {expected[0]!r}'s {expected[1]} training images (fingerprint "
                             f"{expected[2][:12]}); generate a store for this dataset with `python -m zoo.ferkd.generate`")
        return store

    @property
    def num_classes(self) -> int:
        if self.data is None:
            self.setup()
        return self.data.num_classes

    # ------------------------------------------------------------- loaders
    def train_dataloader(self):
        crops = StoredCrops(self.data.x_train, self.data.y_train, self.store, self.usable, self.calibrated,
                            self.num_crops, self.crop_size or self.store["crop_size"])
        return self.stream(crops, self.batch_size // self.num_crops, seed=self.sampler_seed, collate_fn=collate_crops)

    def val_dataloader(self):
        return self.eval_loader(ViewDataset(self.data.x_test, self.data.y_test, {"image": Identity()}),
                                self.eval_batch_size)

    test_dataloader = val_dataloader

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        return normalise_images(batch, self.mean, self.std)
