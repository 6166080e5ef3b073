"""The hierarchical label expansion (HLE) stream: one online pass, coarse labels first, then fine labels.

Single-depth, single-label scenario of the paper (official ``Hyun1A/HLE``, ``data/collections/cifar100_hier_setup2``:
6 tasks, 8,300 coarse-labelled then 5 x 8,340 fine-labelled CIFAR-100 images, each image once):

- every fine class's images are shuffled; the first ``n // (fine_tasks + 1)`` go to task 0 with their *coarse*
  label (83 of 500 on CIFAR-100), the rest to the task of their fine class with their *fine* label (417);
- the fine classes are ordered superclass by superclass (random superclass order, random order of the children)
  and cut into ``fine_tasks`` equal tasks: on CIFAR-100 each fine task brings all children of 4 superclasses, as in
  the official collections; each task's samples are shuffled; the stream is task 0, task 1, ...
- ``fine_only``: the same images at the same positions, every one with its fine label (the flat baseline).

A fine-labelled sample carries its parent (the official samples carry ``klass_sup``), so the learner learns the
hierarchy as fine classes arrive. Hierarchies: CIFAR-100's 20 superclasses (the dataset's own ``coarse_labels``)
and, offline, CIFAR-10's animal = {bird, cat, deer, dog, frog, horse} / vehicle = {airplane, automobile, ship,
truck}.

The stream is cut into chunks of ``batch_size`` new samples (the official ``temp_batchsize``); each chunk is
trained on for ``online_iter * batch_size`` consecutive steps (fractional values accumulate, as the official
``num_updates``), so the stream position of every step is a function of the global step alone: exact resume,
and the same global chunks for any number of processes (each rank gets its ``batch_size / N`` share).
"""
from __future__ import annotations

import math
import pickle

import numpy as np
import torch
from torch.utils.data import Dataset

from zoo.core.data import FixedLengthSampler, StreamDataModule
from zoo.core.datasets import CIFAR10_CLASSES, ImageSet, data_root, load_image_set

__all__ = ["CIFAR10_HIERARCHY", "HLEDataModule", "chunk_of_step", "label_expansion_stream", "updates_before_chunk"]

CIFAR10_HIERARCHY = {"animal": ("bird", "cat", "deer", "dog", "frog", "horse"),
                     "vehicle": ("airplane", "automobile", "ship", "truck")}


def cifar10_parents() -> tuple[np.ndarray, tuple[str, ...]]:
    """Parent (coarse index) of each CIFAR-10 class, and the coarse class names."""
    names = tuple(CIFAR10_HIERARCHY)
    parent = {fine: c for c, children in enumerate(CIFAR10_HIERARCHY.values()) for fine in children}
    return np.array([parent[name] for name in CIFAR10_CLASSES]), names


def cifar100_parents() -> tuple[np.ndarray, tuple[str, ...]]:
    """CIFAR-100's own fine -> coarse map, read from the original pickle torchvision downloaded."""
    folder = data_root() / "cifar100" / "cifar-100-python"
    with open(folder / "train", "rb") as f:
        train = pickle.load(f, encoding="latin1")
    with open(folder / "meta", "rb") as f:
        coarse_names = tuple(pickle.load(f, encoding="latin1")["coarse_label_names"])
    parents = np.zeros(100, np.int64)
    parents[np.asarray(train["fine_labels"])] = np.asarray(train["coarse_labels"])
    return parents, coarse_names


HIERARCHIES = {"cifar10": cifar10_parents, "cifar10_subset": cifar10_parents, "cifar100": cifar100_parents}


def label_expansion_stream(fine_labels: np.ndarray, parents: np.ndarray, fine_tasks: int, seed: int,
                           fine_only: bool = False, per_class: int | None = None) -> dict[str, np.ndarray]:
    """The HLE stream over a training set: per position, the ``image`` index, its ``label`` at its ``level``
    (0 coarse, 1 fine), the ``parent`` a fine label reveals (-1 for a coarse label) and the ``task``."""
    num_fine, num_coarse = len(parents), int(parents.max()) + 1
    if fine_tasks < 1 or num_fine % fine_tasks:
        raise ValueError(f"fine_tasks={fine_tasks} must divide the {num_fine} fine classes")
    rng = np.random.RandomState(seed)
    order = [f for c in rng.permutation(num_coarse) for f in rng.permutation(np.flatnonzero(parents == c))]
    task_of_class = np.empty(num_fine, np.int64)
    task_of_class[order] = 1 + np.arange(num_fine) // (num_fine // fine_tasks)
    coarse_part, fine_parts = [], [[] for _ in range(fine_tasks)]
    for f in range(num_fine):
        images = rng.permutation(np.flatnonzero(fine_labels == f))[:per_class]
        split = len(images) // (fine_tasks + 1)
        coarse_part.append(images[:split])
        fine_parts[task_of_class[f] - 1].append(images[split:])
    tasks = [rng.permutation(np.concatenate(coarse_part))] + [rng.permutation(np.concatenate(p)) for p in fine_parts]
    image = np.concatenate(tasks)
    task = np.concatenate([np.full(len(t), k) for k, t in enumerate(tasks)])
    fine = fine_labels[image]
    level = np.where((task > 0) | fine_only, 1, 0)
    return {"image": image, "label": np.where(level == 1, fine, parents[fine]), "level": level,
            "parent": np.where(level == 1, parents[fine], -1), "task": task}


def updates_before_chunk(chunk: int, batch_size: int, online_iter: float) -> int:
    """Optimizer steps taken before chunk ``chunk`` starts: ``floor(chunk * batch_size * online_iter)``."""
    return math.floor(chunk * batch_size * online_iter + 1e-9)


def chunk_of_step(step: int, batch_size: int, online_iter: float) -> int:
    """The chunk of new samples that optimizer step ``step`` (0-based) trains on."""
    chunk = int(step / (batch_size * online_iter))
    while updates_before_chunk(chunk + 1, batch_size, online_iter) <= step:
        chunk += 1
    while updates_before_chunk(chunk, batch_size, online_iter) > step:
        chunk -= 1
    return chunk


class StreamSampler(FixedLengthSampler):
    """Step ``s`` of an epoch draws the ``batch_size`` stream positions of chunk ``chunk_of_step(s)``; the same
    pass every epoch (the stream is the data: an online learner sees it once, ``max_steps`` = one epoch)."""

    def __init__(self, num_chunks: int, batch_size: int, online_iter: float, steps: int, seed: int, rank: int,
                 world_size: int):
        super().__init__(num_chunks * batch_size, steps * batch_size, seed, rank, world_size)
        self.batch_size, self.online_iter, self.steps = batch_size, online_iter, steps

    def global_draws(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        chunks = torch.tensor([chunk_of_step(s, self.batch_size, self.online_iter) for s in range(self.steps)])
        positions = (chunks[:, None] * self.batch_size + torch.arange(self.batch_size)).flatten()
        return positions, positions  # augmentation is the module's (it also augments memory samples)


class StreamDataset(Dataset):
    def __init__(self, images: np.ndarray, stream: dict[str, np.ndarray]):
        self.images, self.stream = images, stream

    def __len__(self) -> int:
        return len(self.schedule["image"])

    def __getitem__(self, key) -> dict:
        position = key[0] if isinstance(key, tuple) else key
        image = torch.from_numpy(np.ascontiguousarray(self.images[self.stream["image"][position]])).permute(2, 0, 1)
        return {"idx": position, "image": image, "label": int(self.stream["label"][position]),
                "level": int(self.stream["level"][position]), "parent": int(self.stream["parent"][position])}


class TestDataset(Dataset):
    def __init__(self, images: np.ndarray, fine: np.ndarray, parents: np.ndarray):
        self.images, self.fine, self.parents = images, fine, parents

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i) -> dict:
        return {"image": torch.from_numpy(np.ascontiguousarray(self.images[i])).permute(2, 0, 1),
                "fine": int(self.fine[i]), "coarse": int(self.parents[self.fine[i]])}


class HLEDataModule(StreamDataModule):
    """The HLE stream (uint8 images, the module augments and normalises) and the test set with both labels.

    Args:
        dataset: ``cifar100`` (20 superclasses -> 100), ``cifar10`` or ``cifar10_subset`` (animal/vehicle -> 10).
        fine_tasks: tasks of fine labels after the coarse task (official ``N_TASKS=6``: 1 coarse + 5 fine).
        fine_only: every sample carries its fine label (the flat baseline; same images, same positions).
        batch_size: new stream samples per chunk, global (official ``temp_batchsize`` = batchsize / 2 = 8).
        online_iter: optimizer steps per new sample (official ``ONLINE_ITER=3`` on CIFAR-100).
        per_class: keep only this many training images per fine class (CPU-sized streams); None keeps all.
        stream_seed: the stream's order (official collections ``rand0..2``).
        steps_per_epoch: None trains one whole pass; a number stops the pass after that many steps (a smoke run).
    """

    def __init__(self, dataset: str = "cifar100", fine_tasks: int = 5, fine_only: bool = False, batch_size: int = 8,
                 online_iter: float = 3.0, per_class: int | None = None, stream_seed: int = 0,
                 steps_per_epoch: int | None = None, eval_batch_size: int = 256, num_workers: int = 2,
                 download: bool = True, pin_memory: bool = True):
        super().__init__()
        if dataset not in HIERARCHIES:
            raise ValueError(f"dataset={dataset!r} has no hierarchy here; use one of {sorted(HIERARCHIES)}")
        if online_iter * batch_size < 1:
            raise ValueError(f"online_iter={online_iter} x batch_size={batch_size} must be >= 1: every chunk of new "
                             "samples needs at least one step")
        self.dataset, self.fine_tasks, self.fine_only, self.batch_size = dataset, fine_tasks, fine_only, batch_size
        self.online_iter, self.per_class, self.stream_seed = online_iter, per_class, stream_seed
        self.max_steps_per_pass = steps_per_epoch
        self.eval_batch_size, self.num_workers, self.download, self.pin_memory = (eval_batch_size, num_workers,
                                                                                  download, pin_memory)
        self.data: ImageSet | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.data is not None:
            return
        self.data = load_image_set(self.dataset, download=self.download)
        self.parents, self.coarse_names = HIERARCHIES[self.dataset]()
        self.schedule = label_expansion_stream(self.data.y_train, self.parents, self.fine_tasks, self.stream_seed,
                                             self.fine_only, self.per_class)
        self.num_chunks = len(self.schedule["image"]) // self.batch_size  # a last partial chunk is never trained on
        self.stream_length = self.num_chunks * self.batch_size
        self.steps_per_epoch = updates_before_chunk(self.num_chunks, self.batch_size, self.online_iter)
        if self.max_steps_per_pass is not None:
            self.steps_per_epoch = min(self.steps_per_epoch, self.max_steps_per_pass)
        self.mean = torch.tensor(self.data.mean).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(self.data.std).view(1, -1, 1, 1) * 255

    @property
    def num_coarse(self) -> int:
        return len(self.coarse_names)

    def train_dataloader(self):
        rank, world = self.world()
        sampler = StreamSampler(self.num_chunks, self.batch_size, self.online_iter, self.steps_per_epoch,
                                self.stream_seed, rank, world)
        return self.stream(StreamDataset(self.data.x_train, self.schedule), self.batch_size, self.stream_seed, sampler)

    def val_dataloader(self):
        return self.eval_loader(TestDataset(self.data.x_test, self.data.y_test, self.parents), self.eval_batch_size)
