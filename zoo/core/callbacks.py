"""Callbacks every experiment gets from the CLI: last checkpoint, non-finite loss guard, throughput, prediction
samples."""
from __future__ import annotations

import random
import time
import warnings

import numpy as np
import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint

from .media import wandb_loggers

__all__ = ["RandomState", "LastCheckpoint", "NonFiniteLossError", "NonFiniteLossGuard", "SpeedMonitor", "PredictionSamples", "count_samples"]


class LastCheckpoint(ModelCheckpoint):
    """``last.ckpt`` also at the end of training. Lightning skips its end-of-training save once any ``last``
    checkpoint was written, so a run of 1200 steps checkpointed every 500 would end with ``last.ckpt`` at step 1000,
    and rerunning the finished command would train steps 1000-1200 again instead of only re-evaluating."""

    def on_train_end(self, trainer, pl_module) -> None:
        super().on_train_end(trainer, pl_module)
        if self.save_last and self.dirpath is not None:
            trainer.save_checkpoint(f"{self.dirpath}/{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}")


def random_states() -> dict:
    """This process's global random states: Python, NumPy, torch CPU and the current CUDA device, as tensors and
    plain values (checkpoints are loaded with ``weights_only``, which refuses NumPy arrays)."""
    name, keys, position, has_gauss, gauss = np.random.get_state()
    states = {"python": random.getstate(), "torch": torch.get_rng_state(),
              "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(gauss))}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def set_random_states(states: dict) -> None:
    random.setstate(states["python"])
    name, keys, position, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


class RandomState(Callback):
    """Exact resume of everything a method draws from the global generators (dropout, noise, masks, mixing).

    - Every checkpoint holds each process's random states (gathered from all ranks, since only rank 0 writes); a
      resumed run restores its own rank's right before its first training batch, where the interrupted run stood
      when it wrote the checkpoint.
    - Validation runs on a fork of the states and hands the training ones back untouched, so the training
      randomness does not depend on when (or whether) validation ran, e.g. between a checkpoint and the next step.
    """

    def __init__(self):
        self._to_restore: list[dict] | None = None
        self._training_states: dict | None = None

    def state_dict(self) -> dict:
        states = random_states()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, states)
            return {"per_rank": gathered}
        return {"per_rank": [states]}

    def load_state_dict(self, state_dict: dict) -> None:
        self._to_restore = state_dict.get("per_rank")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._to_restore is None:
            return
        states, self._to_restore = self._to_restore, None
        if len(states) != trainer.world_size:
            warnings.warn(f"the checkpoint holds random states of {len(states)} processes, this run has "
                          f"{trainer.world_size}: the methods' random draws will differ from the interrupted run")
            return
        set_random_states(states[trainer.global_rank])

    def on_validation_start(self, trainer, pl_module) -> None:
        self._training_states = random_states()

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._training_states is not None:
            set_random_states(self._training_states)
            self._training_states = None


class NonFiniteLossError(RuntimeError):
    pass


class NonFiniteLossGuard(Callback):
    """Stops training before a NaN/inf loss is back-propagated, so no weights (and no checkpoint) are corrupted."""

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        if not torch.isfinite(loss.detach()).all():
            last = getattr(trainer.checkpoint_callback, "last_model_path", "") or "none yet"
            raise NonFiniteLossError(
                f"loss is {loss.item()} at step {trainer.global_step}; training stopped before applying it. "
                f"Last good checkpoint: {last}. Lower the learning rate, check the inputs, or disable "
                f"mixed precision, then rerun (the run resumes from that checkpoint).")


def count_samples(batch) -> int:
    """Dataset items in a batch: the length of every ``idx`` entry, across streams (labeled + unlabeled)."""
    if isinstance(batch, dict):
        if "idx" in batch:
            return len(batch["idx"])
        return sum(count_samples(v) for v in batch.values())
    if isinstance(batch, (list, tuple)):
        return sum(count_samples(v) for v in batch)
    return 0


class SpeedMonitor(Callback):
    """Logs samples/s (summed over processes) and the share of wall time spent waiting for the next batch."""

    def __init__(self, log_every_n_steps: int = 50, warmup_steps: int = 5):
        self.log_every, self.warmup = log_every_n_steps, warmup_steps
        self.reset()

    def reset(self):
        self.samples = 0
        self.wait = self.compute = 0.0
        self._batch_end = self._batch_start = None
        self._steps = 0

    def on_train_epoch_start(self, trainer, pl_module):
        self._batch_end = None  # the first fetch of an epoch includes starting workers: not steady state

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._batch_start = time.perf_counter()
        self._steps += 1
        if self._batch_end is not None and self._steps > self.warmup:
            self.wait += self._batch_start - self._batch_end

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        now = time.perf_counter()
        if self._steps > self.warmup:
            self.compute += now - self._batch_start
            self.samples += count_samples(batch) * trainer.world_size
        self._batch_end = now
        if self._steps % self.log_every == 0 and self.compute > 0:
            pl_module.log_dict(self.summary(prefix="perf/"), rank_zero_only=True)

    def summary(self, prefix: str = "") -> dict[str, float]:
        total = self.wait + self.compute
        return {f"{prefix}samples_per_sec": self.samples / total if total else 0.0,
                f"{prefix}data_wait_share": self.wait / total if total else 0.0}


class PredictionSamples(Callback):
    """A W&B panel of the first validation images with their predicted and true labels, each validation."""

    def __init__(self, num_images: int = 16):
        self.num_images = num_images

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        loggers = wandb_loggers(trainer)
        if batch_idx or not loggers or not isinstance(outputs, dict) or "preds" not in outputs:
            return
        images = batch["image"][: self.num_images].float()
        lo = images.amin(dim=(1, 2, 3), keepdim=True)
        hi = images.amax(dim=(1, 2, 3), keepdim=True)
        images = ((images - lo) / (hi - lo + 1e-8)).cpu()
        classes = getattr(getattr(trainer.datamodule, "data", None), "classes", None)
        classes = classes or ()

        def name(i: int) -> str:  # a head wider than the dataset's class list can predict an unnamed index
            return classes[i] if i < len(classes) else str(i)

        captions = [f"pred {name(int(p))} / true {name(int(t))}"
                    for p, t in zip(outputs["preds"][: self.num_images], batch["label"][: self.num_images])]
        for lg in loggers:
            lg.log_image("val/samples", list(images), step=trainer.global_step, caption=captions)
