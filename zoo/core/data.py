"""The zoo's one data contract: every training stream of every data module is a fixed-length, sharded, resumable
stream of *global* batches.

- Batch sizes are global: each of N processes loads ``global_batch / N`` items, so the number of steps, the global
  batch and the learning-rate schedule do not depend on N.
- An epoch is ``steps_per_epoch`` batches per stream. :class:`FixedLengthSampler` draws the epoch's items from
  (seed, epoch) alone, and each rank takes a strided share of every global batch, so the ranks' shards are disjoint
  and a run's data do not depend on the number of processes or workers (Lightning's sampler replacement is off).
- On resume the sampler skips what the interrupted run already consumed in the current epoch, gradient
  accumulation included, so the run continues on exactly the batches it would have seen next.

A data module inherits :class:`StreamDataModule` and builds its training loaders with :meth:`~StreamDataModule.stream`
and its evaluation loaders with :meth:`~StreamDataModule.eval_loader`.
"""
from __future__ import annotations

import random
from typing import Callable, Iterator

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from .distributed import rank_and_world
from .views import View

__all__ = ["FixedLengthSampler", "StreamDataModule", "ViewDataset", "normalise_images"]


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


class StreamDataModule(L.LightningDataModule):
    """Base of every data module: builds training streams on the contract above and sharded evaluation loaders.

    A subclass sets ``steps_per_epoch`` (batches per stream and epoch), ``num_workers`` and ``pin_memory`` in its
    constructor (its own arguments, with its defaults), and calls :meth:`stream` once per training stream.
    """

    steps_per_epoch: int
    num_workers: int = 0
    pin_memory: bool = True

    def world(self) -> tuple[int, int]:
        """(rank, world size): the trainer's when attached, torch.distributed's otherwise."""
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        return rank_and_world()

    def per_rank(self, global_batch: int) -> int:
        world = self.world()[1]
        if global_batch % world:
            raise ValueError(f"global batch {global_batch} is not divisible by {world} processes")
        return global_batch // world

    def batches_done(self) -> int:
        """Batches each stream has delivered so far: ``global_step * accumulate_grad_batches``. While Lightning is
        resuming, it may build the loader before it restores its loops (to count the steps of a schedule), with
        ``global_step`` still 0: the position saved in the checkpoint (:meth:`state_dict`) counts until then."""
        if self.trainer is None:
            return 0
        done = self.trainer.global_step * self.trainer.accumulate_grad_batches
        return max(done, getattr(self, "_resumed_batches", 0))

    def epoch_and_offset(self) -> tuple[int, int]:
        """(epoch, batches of it already trained on) of the next batch, from the step alone: every epoch is
        ``steps_per_epoch`` batches, so a run resumed from a checkpoint at an epoch's last step starts the next epoch
        (Lightning's ``current_epoch`` still names the finished one while it builds the loader)."""
        return divmod(self.batches_done(), self.steps_per_epoch)

    def stream(self, dataset: Dataset, global_batch: int, seed: int, sampler: FixedLengthSampler | None = None,
               collate_fn: Callable | None = None) -> DataLoader:
        """A training loader of ``global_batch`` items per step over all processes (this rank's share),
        ``steps_per_epoch`` steps per epoch, fast-forwarded past what this epoch already consumed.

        ``sampler`` replaces the uniform :class:`FixedLengthSampler` (a subclass with other draws, built for
        ``world()``); it must yield ``global_batch * steps_per_epoch / world`` keys per epoch."""
        rank, world = self.world()
        per_rank = self.per_rank(global_batch)
        if sampler is None:
            sampler = FixedLengthSampler(len(dataset), global_batch * self.steps_per_epoch, seed, rank, world)
        epoch, offset = self.epoch_and_offset()
        # the epoch is set here too: worker processes may draw from the sampler before Lightning calls set_epoch
        sampler.set_epoch(epoch)
        sampler.fast_forward(offset * per_rank)
        return DataLoader(dataset, batch_size=per_rank, sampler=sampler, drop_last=True, collate_fn=collate_fn,
                          **self._loader_kwargs(seed))

    def state_dict(self) -> dict:
        """The training position, saved in every checkpoint (see :meth:`batches_done`)."""
        return {"batches_done": self.batches_done()}

    def load_state_dict(self, state: dict) -> None:
        self._resumed_batches = int(state.get("batches_done", 0))

    def eval_loader(self, dataset: Dataset, batch_size: int, collate_fn: Callable | None = None) -> DataLoader:
        """An evaluation loader in dataset order; sharded over processes (``batch_size`` per process)."""
        sampler = DistributedSampler(dataset, shuffle=False) if self.world()[1] > 1 else None
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate_fn,
                          **self._loader_kwargs(0))

    def _loader_kwargs(self, seed: int) -> dict:
        # a loader's own generator: starting an iterator (each epoch, each evaluation) then draws its worker seed
        # from it instead of from the global generator the method's own random draws come from
        return {"num_workers": self.num_workers, "pin_memory": self.pin_memory and torch.cuda.is_available(),
                "persistent_workers": self.num_workers > 0, "generator": torch.Generator().manual_seed(seed)}


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


def normalise_images(batch, mean: torch.Tensor, std: torch.Tensor):
    """Every uint8 NCHW tensor of ``batch`` (nested dicts) -> float, normalised with 0..255-scale ``mean``/``std``,
    channels-last."""
    if isinstance(batch, dict):
        return {k: normalise_images(v, mean, std) for k, v in batch.items()}
    if isinstance(batch, torch.Tensor) and batch.dtype == torch.uint8 and batch.ndim == 4:
        mean, std = mean.to(batch.device), std.to(batch.device)
        return ((batch.float() - mean) / std).contiguous(memory_format=torch.channels_last)
    return batch
