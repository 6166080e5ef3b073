"""Class-incremental task streams: task ``t`` trains on the images of its own classes only, for ``steps_per_task``
optimizer steps, and is then left for good; every task keeps a held-out set of its classes for evaluation.

The task of a global batch is a function of its global step alone (``task_of_step``), so the stream follows the
zoo's data contract (``zoo.core.data``) unchanged: :class:`TaskStreamSampler` draws each epoch's global batches from
(seed, epoch, step) and the current task's pool, shards them over ranks, and fast-forwards on resume; a run resumed
in the middle of task 3 continues on exactly the batches of task 3 it would have seen next.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader

from zoo.core.data import FixedLengthSampler, StreamDataModule, ViewDataset, normalise_images
from zoo.core.datasets import ImageSet, load_image_set
from zoo.core.views import Identity, View, WeakView

__all__ = ["TaskStreamDataModule", "TaskStreamSampler", "class_splits"]


def class_splits(num_classes: int, num_tasks: int, order_seed: int | None = None) -> list[list[int]]:
    """``num_tasks`` disjoint, equal class sets covering ``range(num_classes)``: in label order, or in a random
    order drawn with ``order_seed`` (the usual class-incremental protocol)."""
    if num_tasks < 1 or num_classes % num_tasks:
        raise ValueError(f"num_tasks={num_tasks} must divide the {num_classes} classes of the dataset")
    order = (np.arange(num_classes) if order_seed is None
             else np.random.default_rng(order_seed).permutation(num_classes))
    return [sorted(int(c) for c in chunk) for chunk in np.split(order, num_tasks)]


class TaskStreamSampler(FixedLengthSampler):
    """:class:`FixedLengthSampler` whose global batch at global step ``g`` is drawn from the pool of task
    ``task_of_step(g)`` only (``pools[t]``: dataset indices). Within an epoch, the batches of one task are
    consecutive slices of random permutations of its pool seeded by (seed, epoch, task)."""

    def __init__(self, pools: list[np.ndarray], task_of_step, global_batch: int, steps_per_epoch: int,
                 seed: int = 0, rank: int = 0, world_size: int = 1):
        super().__init__(sum(len(p) for p in pools), global_batch * steps_per_epoch, seed, rank, world_size)
        self.pools, self.task_of_step = [torch.as_tensor(p, dtype=torch.long) for p in pools], task_of_step
        self.global_batch, self.steps_per_epoch = global_batch, steps_per_epoch

    def global_draws(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        first_step = epoch * self.steps_per_epoch
        tasks = [self.task_of_step(first_step + s) for s in range(self.steps_per_epoch)]
        indices = torch.empty(self.samples_per_epoch, dtype=torch.long)
        for task in sorted(set(tasks)):
            steps = [s for s, t in enumerate(tasks) if t == task]
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 1_009 + task)
            pool = self.pools[task]
            needed = len(steps) * self.global_batch
            reps = -(-needed // len(pool))
            draws = pool[torch.cat([torch.randperm(len(pool), generator=g) for _ in range(reps)])[:needed]]
            for k, s in enumerate(steps):
                indices[s * self.global_batch : (s + 1) * self.global_batch] = draws[k * self.global_batch :
                                                                                     (k + 1) * self.global_batch]
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return indices, torch.randint(0, 2**62, (self.samples_per_epoch,), generator=g)


class TaskStreamDataModule(StreamDataModule):
    """A class-incremental stream of ``num_tasks`` tasks over ``dataset`` (one of ``zoo.core.datasets.IMAGE_SETS``).

    Training batches are ``{"image": uint8 -> normalised on the device, "label", "idx"}`` of the current task;
    labels are never needed by a self-supervised method but are kept for supervised continual learners. Evaluation
    reads the tasks one by one: :meth:`task_loader` (a task's train or test images, no augmentation) and
    :meth:`anneal_batches` (a task's training stream, for a short extra phase on a copy of the model).
    ``val_dataloader`` is the test images of every task together.

    Args:
        dataset: the image set split into tasks.
        num_tasks: tasks (disjoint class sets of equal size); ``class_order_seed`` shuffles the class order.
        steps_per_task: optimizer steps on each task; after the last task the stream stays on it.
        batch_size: global batch per step (split across ranks). steps_per_epoch: validation / checkpoint cadence.
        train_view: augmentation of the training stream (default: flip + translate).
        eval_batch_size, num_workers, sampler_seed, download, pin_memory: as in every data module.
    """

    def __init__(self, dataset: str = "cifar10_subset", num_tasks: int = 5, class_order_seed: int | None = None,
                 steps_per_task: int = 200, batch_size: int = 64, steps_per_epoch: int = 100,
                 train_view: View | None = None, eval_batch_size: int = 256, num_workers: int = 2,
                 sampler_seed: int = 0, download: bool = False, pin_memory: bool = True):
        super().__init__()
        if steps_per_task < 1:
            raise ValueError(f"steps_per_task must be >= 1, got {steps_per_task}")
        self.dataset, self.num_tasks, self.class_order_seed = dataset, num_tasks, class_order_seed
        self.steps_per_task, self.batch_size, self.steps_per_epoch = steps_per_task, batch_size, steps_per_epoch
        self.train_view = train_view if train_view is not None else WeakView()
        self.eval_batch_size, self.num_workers, self.sampler_seed = eval_batch_size, num_workers, sampler_seed
        self.download, self.pin_memory = download, pin_memory
        self.data: ImageSet | None = None

    # ------------------------------------------------------------------ tasks
    def task_of_step(self, step: int) -> int:
        """The task trained at global optimizer step ``step`` (0-based)."""
        return min(step // self.steps_per_task, self.num_tasks - 1)

    def is_task_end(self, steps_done: int) -> bool:
        """Whether ``steps_done`` optimizer steps complete a task (true after each task's last step)."""
        finished, rest = divmod(steps_done, self.steps_per_task)
        return rest == 0 and 1 <= finished <= self.num_tasks

    # ------------------------------------------------------------------ setup
    def prepare_data(self) -> None:
        load_image_set(self.dataset, download=self.download)

    def setup(self, stage: str | None = None) -> None:
        if self.data is not None:
            return
        self.data = load_image_set(self.dataset, download=self.download)
        self.task_classes = class_splits(self.data.num_classes, self.num_tasks, self.class_order_seed)
        self.train_pools = [np.flatnonzero(np.isin(self.data.y_train, c)) for c in self.task_classes]
        self.test_pools = [np.flatnonzero(np.isin(self.data.y_test, c)) for c in self.task_classes]
        self.mean = torch.tensor(self.data.mean).view(1, -1, 1, 1) * 255  # 0..255 scale, applied on the device
        self.std = torch.tensor(self.data.std).view(1, -1, 1, 1) * 255

    # ------------------------------------------------------------- loaders
    def train_dataloader(self) -> DataLoader:
        dataset = ViewDataset(self.data.x_train, self.data.y_train, {"image": self.train_view})
        rank, world = self.world()
        sampler = TaskStreamSampler(self.train_pools, self.task_of_step, self.batch_size, self.steps_per_epoch,
                                    self.sampler_seed, rank, world)
        return self.stream(dataset, self.batch_size, self.sampler_seed, sampler=sampler)

    def task_loader(self, task: int, split: str = "test") -> DataLoader:
        """Task ``task``'s ``train`` or ``test`` images in dataset order, unaugmented, whole on every process
        (evaluation on frozen features is small and every process computes the same numbers)."""
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        x, y, pools = ((self.data.x_train, self.data.y_train, self.train_pools) if split == "train" else
                       (self.data.x_test, self.data.y_test, self.test_pools))
        pool = pools[task]
        return DataLoader(ViewDataset(x[pool], y[pool], {"image": Identity()}), batch_size=self.eval_batch_size)

    def anneal_batches(self, task: int, steps: int, seed: int) -> DataLoader:
        """``steps`` global training batches of task ``task`` (augmented), drawn from ``seed``: the same on every
        process, for an extra phase on a copy of the model."""
        pool = torch.as_tensor(self.train_pools[task])
        g = torch.Generator().manual_seed(seed)
        reps = -(-steps * self.batch_size // len(pool))
        order = torch.cat([torch.randperm(len(pool), generator=g) for _ in range(reps)])[: steps * self.batch_size]
        keys = list(zip(pool[order].tolist(), torch.randint(0, 2**62, (len(order),), generator=g).tolist()))
        dataset = ViewDataset(self.data.x_train, self.data.y_train, {"image": self.train_view})
        return DataLoader(dataset, batch_size=self.batch_size, sampler=keys)

    def val_dataloader(self) -> DataLoader:
        pool = np.concatenate(self.test_pools)
        return self.eval_loader(ViewDataset(self.data.x_test[pool], self.data.y_test[pool], {"image": Identity()}),
                                self.eval_batch_size)

    # ----------------------------------------------------- on the device
    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        return normalise_images(batch, self.mean, self.std)
