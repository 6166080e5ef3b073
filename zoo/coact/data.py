"""The few-shot class-incremental session stream (FSCIT / FSCIL).

Classes arrive in label order: session 0 holds the ``base_classes`` first classes, every later session the next
``ways`` classes. Each session trains on exactly ``shots`` images per class of its own classes (``base_shots`` in
the base session: ``None`` = the same K, ``-1`` = every image, the classic FSCIL base session), chosen once per
class by a seeded shuffle (``split_seed``); the test set of a session holds every test image of the classes seen
so far (official ``dataloaders/datasets/hf_dataset.py``).

The session is a function of the global step alone: an epoch is ``steps_per_epoch`` global batches (the official
"epoch", one pass over a session's K-shot set), the base session lasts ``base_epochs`` epochs and every
incremental session ``incremental_epochs`` epochs. The training loader is rebuilt every epoch
(``trainer.reload_dataloaders_every_n_epochs: 1``) on the session of that epoch, so a resumed run trains on exactly
the batches and the classes the uninterrupted run would have seen.

Views (official ``get_transform``): two independent draws of RandomResizedCrop + horizontal flip + colour jitter
(0.4, 0.4, 0.4, 0.1) with p 0.8 + grayscale with p 0.2: ``view1`` the student's query, ``view2`` the teacher's
key. Prototypes and the test set use the plain image (``image``).
"""
from __future__ import annotations

import random

import numpy as np
import torch
import torch.nn.functional as F

from zoo.core.data import StreamDataModule, ViewDataset, normalise_images
from zoo.core.datasets import ImageSet, load_image_set
from zoo.core.views import View
from zoo.ssl.views import SSLView

__all__ = ["FewShotIncrementalDataModule", "few_shot_indices"]


def few_shot_indices(labels: np.ndarray, classes: np.ndarray, shots: int, seed: int) -> np.ndarray:
    """The first ``shots`` indices of each class in ``classes`` after one seeded shuffle per class (``shots=-1``:
    all of them). The choice of a class never depends on the other classes, so sessions never share an image."""
    chosen = []
    for c in classes:
        indices = np.flatnonzero(labels == c)
        np.random.RandomState(seed * 1009 + int(c)).shuffle(indices)
        if 0 <= shots and len(indices) < shots:
            raise ValueError(f"class {c} has {len(indices)} training images, fewer than shots={shots}")
        chosen.append(indices if shots < 0 else indices[:shots])
    return np.concatenate(chosen)


class FewShotIncrementalDataModule(StreamDataModule):
    """Session-by-session few-shot training stream; the test set of the classes seen so far.

    Args:
        dataset: an offline/real image set (``zoo.core.datasets.load_image_set``).
        base_classes, ways: classes of the base session and of each incremental session.
        shots: training images per class and session (FSCIT: 10; FSCIL: 5).
        base_shots: the base session's images per class (``None``: ``shots``; ``-1``: all, as FSCIL).
        num_sessions: sessions in all, base included (``None``: as many as the classes allow).
        base_epochs, incremental_epochs: epochs (of ``steps_per_epoch`` steps) per session (official
            ``epochs_base`` 50, ``epochs_incremental`` 1 for CIFAR-100 FSCIT).
        batch_size: global batch (official 64); steps_per_epoch: batches per epoch (ceil(100 / 64) = 2 for the
            10 x 10-shot sessions of CIFAR-100 FSCIT).
        image_size: the side of every view (``None``: the dataset's).
        crop_scale, flip_p: the views' RandomResizedCrop area range and flip probability.
        eval_batch_size: per process; split_seed: the few-shot choice; sampler_seed: the batch draws.
    """

    def __init__(self, dataset: str = "cifar100", base_classes: int = 10, ways: int = 10, shots: int = 10,
                 base_shots: int | None = None, num_sessions: int | None = None, base_epochs: int = 50,
                 incremental_epochs: int = 1, batch_size: int = 64, steps_per_epoch: int = 2,
                 image_size: int | None = 224, crop_scale: tuple[float, float] = (0.08, 1.0), flip_p: float = 0.5,
                 eval_batch_size: int = 100, num_workers: int = 4, split_seed: int = 0, sampler_seed: int = 0,
                 download: bool = True, pin_memory: bool = True):
        super().__init__()
        if shots < 1:
            raise ValueError(f"shots must be >= 1, got {shots}")
        if base_shots is not None and base_shots != -1 and base_shots < 1:
            raise ValueError(f"base_shots must be None, -1 (all images) or >= 1, got {base_shots}")
        if base_classes < 1 or ways < 1 or base_epochs < 1 or incremental_epochs < 1:
            raise ValueError("base_classes, ways, base_epochs and incremental_epochs must be >= 1, got "
                             f"{base_classes}, {ways}, {base_epochs}, {incremental_epochs}")
        self.dataset, self.base_classes, self.ways, self.shots = dataset, base_classes, ways, shots
        self.base_shots = shots if base_shots is None else base_shots
        self.requested_sessions, self.base_epochs, self.incremental_epochs = num_sessions, base_epochs, incremental_epochs
        self.batch_size, self.steps_per_epoch, self.image_size = batch_size, steps_per_epoch, image_size
        self.views = {name: SSLView(image_size, tuple(crop_scale), flip_p=flip_p, brightness=0.4, contrast=0.4,
                                    saturation=0.4, hue=0.1, brightness_mode="multiplicative", blur_p=0.0)
                      for name in ("view1", "view2")}
        self.plain = Resize(image_size)
        self.eval_batch_size, self.num_workers, self.pin_memory = eval_batch_size, num_workers, pin_memory
        self.split_seed, self.sampler_seed, self.download = split_seed, sampler_seed, download
        self.data: ImageSet | None = None

    # ------------------------------------------------------------------ setup
    def prepare_data(self) -> None:
        load_image_set(self.dataset, download=self.download)

    def setup(self, stage: str | None = None) -> None:
        if self.data is not None:
            return
        data = load_image_set(self.dataset, download=self.download)
        possible = 1 + (data.num_classes - self.base_classes) // self.ways
        if self.base_classes > data.num_classes or (self.requested_sessions or 1) > possible:
            raise ValueError(f"{self.dataset} has {data.num_classes} classes: base_classes={self.base_classes}, "
                             f"ways={self.ways} allow at most {possible} sessions, got num_sessions={self.requested_sessions}")
        self.num_sessions = self.requested_sessions or possible
        self.data = data
        self.mean = torch.tensor(data.mean).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(data.std).view(1, -1, 1, 1) * 255
        self.session_idx = [few_shot_indices(data.y_train, self.session_classes(s),
                                             self.base_shots if s == 0 else self.shots, self.split_seed)
                            for s in range(self.num_sessions)]

    @property
    def num_classes(self) -> int:
        """Classes of all sessions: the classifier's width from the start (official ``args.num_classes``)."""
        if self.data is None:
            self.setup()
        return self.base_classes + (self.num_sessions - 1) * self.ways

    # ------------------------------------------------------------- the session schedule
    @property
    def total_epochs(self) -> int:
        return self.base_epochs + (self.num_sessions - 1) * self.incremental_epochs

    def session_of_epoch(self, epoch: int) -> int:
        if epoch < self.base_epochs:
            return 0
        return min(1 + (epoch - self.base_epochs) // self.incremental_epochs, self.num_sessions - 1)

    def session_of_step(self, step: int) -> int:
        return self.session_of_epoch(step // self.steps_per_epoch)

    def session_start_step(self, session: int) -> int:
        epochs = 0 if session == 0 else self.base_epochs + (session - 1) * self.incremental_epochs
        return epochs * self.steps_per_epoch

    def session_classes(self, session: int) -> np.ndarray:
        start = 0 if session == 0 else self.base_classes + (session - 1) * self.ways
        return np.arange(start, self.base_classes if session == 0 else start + self.ways)

    def seen_classes(self, session: int) -> int:
        return self.base_classes + session * self.ways

    def support(self, session: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The session's K-shot training images (plain, normalised, NCHW float) and labels: the prototypes' data."""
        idx = self.session_idx[session]
        images = torch.stack([torch.from_numpy(self.plain(x, None)).permute(2, 0, 1) for x in self.data.x_train[idx]])
        return normalise_images(images, self.mean, self.std), torch.from_numpy(self.data.y_train[idx])

    # ------------------------------------------------------------- loaders
    def train_dataloader(self):
        epoch = self.epoch_and_offset()[0]
        if (getattr(self.trainer, "max_epochs", None) or 0) > self.total_epochs:
            raise ValueError(f"trainer.max_epochs={self.trainer.max_epochs} runs past the last session: the stream "
                             f"has {self.total_epochs} epochs ({self.base_epochs} base + {self.num_sessions - 1} x "
                             f"{self.incremental_epochs})")
        idx = self.session_idx[self.session_of_epoch(epoch)]
        dataset = ViewDataset(self.data.x_train[idx], self.data.y_train[idx], self.views)
        return self.stream(dataset, self.batch_size, seed=self.sampler_seed)

    def val_dataloader(self):
        """Test images of every class seen up to the session just trained (the sanity check: the base session)."""
        step = self.trainer.global_step if self.trainer is not None else 0
        seen = self.seen_classes(self.session_of_step(max(step - 1, 0)))
        keep = self.data.y_test < seen
        return self.eval_loader(ViewDataset(self.data.x_test[keep], self.data.y_test[keep], {"image": self.plain}),
                                self.eval_batch_size)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        return normalise_images(batch, self.mean, self.std)


class Resize(View):
    """The evaluation view: the image resized (bilinear, antialiased) to ``size`` x ``size`` (official ``Resize`` +
    ``CenterCrop`` of a square image); ``None`` keeps it."""

    def __init__(self, size: int | None):
        self.size = size

    def __call__(self, image: np.ndarray, rng: random.Random | None) -> np.ndarray:
        if self.size is None or image.shape[:2] == (self.size, self.size):
            return image
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
        x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        return x[0].round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
