"""Class splits for few-shot learning and the base-class training stream.

A few-shot benchmark splits the *classes*: an encoder is trained with plain cross-entropy on the base classes, and
evaluated on N-way K-shot episodes drawn from novel classes it never saw (``zoo.fewshot.episodes``). A
:class:`FewShotSplit` holds the four image sets of such a benchmark:

- ``base``: the base-class training images (labels 0..B-1), the stream the encoder trains on;
- ``base_test``: held-out images of the base classes (``val/acc`` of the base classifier, a sanity check);
- ``novel``: the novel-class images the test episodes are drawn from;
- ``novel_val``: other images (or other classes) for validation episodes (tuning a method's lambda).

On a 10-class set (``cifar10_subset``, ``imagenette_subset``, ...) the first half of the classes is the base and the
second half the novel split; the test split's novel images make the test episodes and the training split's novel
images the validation episodes (same classes, disjoint images: there are too few classes for a class-disjoint
validation split). ``mini_imagenet`` is the real benchmark (Ravi & Larochelle's 64 / 16 / 20 class split).
"""
from __future__ import annotations

import csv
from dataclasses import dataclass

import numpy as np
import torch

from zoo.core.data import StreamDataModule, ViewDataset, normalise_images
from zoo.core.datasets import IMAGENET_MEAN_01, IMAGENET_STD_01, load_image_set, require_file
from zoo.core.views import Identity, View, WeakView

__all__ = ["BaseClassDataModule", "FewShotSplit", "class_split", "load_few_shot_split", "load_mini_imagenet"]


@dataclass
class FewShotSplit:
    name: str
    base: tuple[np.ndarray, np.ndarray]  # (uint8 NHWC images, int64 labels); base labels are 0..B-1
    base_test: tuple[np.ndarray, np.ndarray]
    novel: tuple[np.ndarray, np.ndarray]  # novel labels keep their own ids (episodes relabel them 0..N-1)
    novel_val: tuple[np.ndarray, np.ndarray]
    mean: tuple[float, ...]  # per channel, in [0, 1]
    std: tuple[float, ...]

    @property
    def num_base_classes(self) -> int:
        return int(self.base[1].max()) + 1


def _select(x: np.ndarray, y: np.ndarray, classes: list[int], relabel: bool) -> tuple[np.ndarray, np.ndarray]:
    keep = np.isin(y, classes)
    labels = y[keep]
    if relabel:
        labels = np.searchsorted(np.asarray(sorted(classes)), labels)
    return x[keep], labels.astype(np.int64)


def class_split(dataset: str, base_classes: list[int] | None = None, download: bool = False) -> FewShotSplit:
    """A class split of one of ``zoo.core.datasets.IMAGE_SETS``: ``base_classes`` (default the first half) are
    the base, the others the novel classes; novel test images -> ``novel``, novel training images -> ``novel_val``."""
    images = load_image_set(dataset, download=download)
    num_classes = images.num_classes
    base_classes = list(range(num_classes // 2)) if base_classes is None else sorted(base_classes)
    novel_classes = [c for c in range(num_classes) if c not in base_classes]
    if not base_classes or len(novel_classes) < 2 or not set(base_classes) <= set(range(num_classes)):
        raise ValueError(f"base_classes={base_classes}: choose a non-empty subset of 0..{num_classes - 1} of "
                         f"{dataset} that leaves at least 2 novel classes")
    return FewShotSplit(f"{dataset}_{len(base_classes)}base",
                        _select(images.x_train, images.y_train, base_classes, relabel=True),
                        _select(images.x_test, images.y_test, base_classes, relabel=True),
                        _select(images.x_test, images.y_test, novel_classes, relabel=False),
                        _select(images.x_train, images.y_train, novel_classes, relabel=False),
                        images.mean, images.std)


MINI_IMAGENET_HOW = ("Get mini-ImageNet (Ravi & Larochelle's split: images/*.jpg and split/{train,val,test}.csv, "
                     "e.g. the archive linked in imtiazziko/SLK-few-shot's README) and place it in that folder.")


def _read_split(split: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    rows = list(csv.reader(require_file(f"mini_imagenet/split/{split}.csv", MINI_IMAGENET_HOW).open()))[1:]
    classes = sorted({label for _, label in rows})
    x = np.stack([np.asarray(Image.open(require_file(f"mini_imagenet/images/{name}", MINI_IMAGENET_HOW))
                             .convert("RGB").resize((size, size), Image.BILINEAR)) for name, _ in rows])
    return x, np.asarray([classes.index(label) for _, label in rows], np.int64)


def load_mini_imagenet(size: int = 84, held_out_per_class: int = 30) -> FewShotSplit:
    """mini-ImageNet at ``size`` px: 64 base classes (600 images each, the last ``held_out_per_class`` of each kept
    out of training for ``val/acc``), 20 novel (test) classes, 16 validation classes for ``novel_val``."""
    x, y = _read_split("train", size)
    held_out = np.concatenate([np.flatnonzero(y == c)[-held_out_per_class:] for c in range(y.max() + 1)])
    train = np.setdiff1d(np.arange(len(y)), held_out)
    return FewShotSplit("mini_imagenet", (x[train], y[train]), (x[held_out], y[held_out]), _read_split("test", size),
                        _read_split("val", size), IMAGENET_MEAN_01, IMAGENET_STD_01)


def load_few_shot_split(dataset: str, base_classes: list[int] | None = None, download: bool = False) -> FewShotSplit:
    if dataset == "mini_imagenet":
        return load_mini_imagenet()
    return class_split(dataset, base_classes, download)


class BaseClassDataModule(StreamDataModule):
    """The base-class training stream (``batch["image"]``, ``batch["label"]``) and the held-out base-class images
    for evaluation; what the encoder of a few-shot method trains on (no episodes: plain classification).

    Args:
        dataset: ``mini_imagenet`` or one of ``zoo.core.datasets.IMAGE_SETS`` split by :func:`class_split`.
        base_classes: the base classes of a class split (default the first half).
        batch_size: global batch per step (split across ranks).
        steps_per_epoch: optimizer steps per epoch (validation and checkpoint cadence).
        view: the training augmentation (default crop + flip).
    """

    def __init__(self, dataset: str = "cifar10_subset", base_classes: list[int] | None = None, batch_size: int = 128,
                 steps_per_epoch: int = 100, view: View | None = None, eval_batch_size: int = 256,
                 num_workers: int = 4, sampler_seed: int = 0, download: bool = False, pin_memory: bool = True):
        super().__init__()
        self.dataset, self.base_classes, self.batch_size = dataset, base_classes, batch_size
        self.steps_per_epoch, self.view = steps_per_epoch, view if view is not None else WeakView()
        self.eval_batch_size, self.num_workers, self.sampler_seed = eval_batch_size, num_workers, sampler_seed
        self.download, self.pin_memory = download, pin_memory
        self.split: FewShotSplit | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.split is not None:
            return
        self.split = load_few_shot_split(self.dataset, self.base_classes, self.download)
        # normalisation constants on the 0..255 scale, applied on the device
        self.mean = torch.tensor(self.split.mean).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(self.split.std).view(1, -1, 1, 1) * 255

    @property
    def num_classes(self) -> int:
        self.setup()
        return self.split.num_base_classes

    def train_dataloader(self):
        return self.stream(ViewDataset(*self.split.base, {"image": self.view}), self.batch_size, self.sampler_seed)

    def val_dataloader(self):
        return self.eval_loader(ViewDataset(*self.split.base_test, {"image": Identity()}), self.eval_batch_size)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        return normalise_images(batch, self.mean, self.std)
