"""Source/target classification data for MIC's classification variant.

Batch: ``{"source": {"idx", "label", "image"}, "target": {"idx", "label", "image"}}`` (target labels only for
diagnostics), uint8 images normalised on the device with ImageNet statistics (Transfer-Learning-Library's
default); evaluation on the target's test split. Streams are :class:`FixedLengthSampler` s, so they shard across
ranks and resume exactly.

Datasets: ``mnist`` -> ``usps`` (offline; USPS's 16x16 digits resized to MNIST's 28x28, bilinear), and
``visda_synthetic`` -> ``visda_real`` (VisDA-2017 from ``ZOO_DATA_DIR/visda-2017``: ``train/`` and ``validation/``
with TLlib's ``image_list/{train,validation}.txt``; images resized to 256 and centre-cropped to 224, random
horizontal flip for training, as SDAT's ``--train-resizing cen.crop``).
"""
from __future__ import annotations

import random

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.combined_loader import CombinedLoader
from PIL import Image
from torch.utils.data import Dataset

from zoo.core.data import StreamDataModule
from zoo.core.datasets import IMAGENET_MEAN, IMAGENET_STD, MissingDatasetError, data_root, load_image_set

__all__ = ["DomainAdaptationDataModule", "VISDA_CLASSES"]

VISDA_CLASSES = ("aeroplane", "bicycle", "bus", "car", "horse", "knife", "motorcycle", "person", "plant",
                 "skateboard", "train", "truck")


class ArrayImages(Dataset):
    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key) -> dict:
        index = key[0] if isinstance(key, tuple) else key
        return {"idx": index, "label": int(self.labels[index]),
                "image": torch.from_numpy(np.ascontiguousarray(self.images[index])).permute(2, 0, 1)}


class FileImages(Dataset):
    """Resize(256) + CenterCrop(224), with a random horizontal flip when ``train``."""

    def __init__(self, paths: list, labels: np.ndarray, train: bool):
        self.paths, self.labels, self.train = paths, labels, train

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key) -> dict:
        index, seed = key if isinstance(key, tuple) else (key, key)
        image = Image.open(self.paths[index]).convert("RGB")
        w, h = image.size
        scale = 256 / min(w, h)
        image = image.resize((round(w * scale), round(h * scale)), Image.BILINEAR)
        left, top = (image.size[0] - 224) // 2, (image.size[1] - 224) // 2
        image = np.asarray(image.crop((left, top, left + 224, top + 224)))
        if self.train and random.Random(seed).random() < 0.5:
            image = image[:, ::-1]
        return {"idx": index, "label": int(self.labels[index]),
                "image": torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)}


def _digits(name: str, split: str) -> Dataset:
    data = load_image_set(name, download=False)
    images, labels = (data.x_train, data.y_train) if split == "train" else (data.x_test, data.y_test)
    if images.shape[1] != 28:  # USPS 16x16 -> 28x28
        resized = F.interpolate(torch.from_numpy(images).permute(0, 3, 1, 2).float(), size=(28, 28),
                                mode="bilinear", align_corners=False)
        images = resized.round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
    return ArrayImages(images, labels)


def _visda(domain: str, split: str) -> Dataset:
    root = data_root() / "visda-2017"
    folder = "train" if domain == "synthetic" else "validation"
    listing = root / "image_list" / f"{folder}.txt"
    if not listing.exists():
        raise MissingDatasetError(
            f"VisDA-2017 not found: expected {listing.resolve()} (lines '<{folder}/class/file> <label>') and the "
            f"images under {root.resolve()}/{folder}/.\n  Download train.tar and validation.tar from "
            "http://csr.bu.edu/ftp/visda17/clf/ and Transfer-Learning-Library's image_list/ for VisDA2017.")
    rows = [line.split() for line in listing.read_text().splitlines() if line.strip()]
    return FileImages([root / r[0] for r in rows], np.array([int(r[1]) for r in rows]), train=split == "train")


DOMAINS = {"mnist": lambda split: _digits("mnist", split), "usps": lambda split: _digits("usps", split),
           "visda_synthetic": lambda split: _visda("synthetic", split),
           "visda_real": lambda split: _visda("real", split)}


class DomainAdaptationDataModule(StreamDataModule):
    """Labelled source + unlabelled target streams, both ``batch_size`` per step; evaluation on the target.

    VisDA-2017's real domain is both the unlabelled target and the evaluation set (its validation split), as
    in SDAT/MIC; the digits use USPS's train split as target and its test split for evaluation.
    """

    def __init__(self, source: str = "visda_synthetic", target: str = "visda_real", batch_size: int = 32,
                 steps_per_epoch: int = 1000, eval_batch_size: int = 64, num_workers: int = 4,
                 sampler_seed: int = 0, pin_memory: bool = True):
        super().__init__()
        for name in (source, target):
            if name not in DOMAINS:
                raise ValueError(f"unknown domain {name!r}; available: {sorted(DOMAINS)}")
        self.source, self.target, self.batch_size, self.steps_per_epoch = source, target, batch_size, steps_per_epoch
        self.eval_batch_size, self.num_workers, self.sampler_seed, self.pin_memory = (
            eval_batch_size, num_workers, sampler_seed, pin_memory)
        self.dataset = f"{source}->{target}"
        self.sets = None

    def setup(self, stage: str | None = None) -> None:
        if self.sets is None:
            self.sets = {"source": DOMAINS[self.source]("train"), "target": DOMAINS[self.target]("train"),
                         "val": DOMAINS[self.target]("test")}
        self.mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

    def train_dataloader(self):
        return CombinedLoader({"source": self.stream(self.sets["source"], self.batch_size, self.sampler_seed * 2),
                               "target": self.stream(self.sets["target"], self.batch_size, self.sampler_seed * 2 + 1)},
                              mode="min_size")

    def val_dataloader(self):
        return self.eval_loader(self.sets["val"], self.eval_batch_size)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        def convert(item):
            if isinstance(item, dict):
                return {k: convert(v) for k, v in item.items()}
            if isinstance(item, torch.Tensor) and item.dtype == torch.uint8 and item.ndim == 4:
                return (item.float() - self.mean.to(item.device)) / self.std.to(item.device)
            return item
        return convert(batch)
