"""Multi-source domain generalisation data, DomainBed's protocol (``domainbed/scripts/train.py``, ``datasets.py``).

- Leave one domain out: ``test_domain`` is never trained on; the other domains are the training domains.
- Each training domain is split once (``split_seed``) into a training part and a validation part of
  ``holdout_fraction`` (DomainBed: 0.2), the latter for *training-domain validation* model selection.
- Every training step takes ``batch_size`` images from *each* training domain (DomainBed: 32 per domain, one
  infinite loader per domain): the global batch is ``batch_size x domains``, concatenated domain by domain.
- Training augmentation (DomainBed's ``augment_transform``): random resized crop (scale 0.7-1), horizontal flip,
  colour jitter 0.3 (brightness, contrast, saturation, hue), random greyscale (p 0.1); ImageNet normalisation.

Datasets: ``pacs`` is the full PACS in DomainBed's layout (``<root>/PACS/<domain>/<class>/*.jpg``, 9,991 images,
resized to ``image_size``); ``pacs_64px_subset`` is the zoo's offline subset (64 images per class and domain at
64x64, ``pacs/pacs_64px_64per.npz``).
"""
from __future__ import annotations

import random

import numpy as np
import torch
import torchvision.transforms.v2 as T

from zoo.core.data import FixedLengthSampler, StreamDataModule, ViewDataset, normalise_images
from zoo.core.datasets import IMAGENET_MEAN, IMAGENET_STD, PACS_DOMAINS, require_file
from zoo.core.views import Identity, View

__all__ = ["DomainBalancedSampler", "DomainBedView", "DomainGeneralizationDataModule", "load_pacs"]

PACS_CLASSES = ("dog", "elephant", "giraffe", "guitar", "horse", "house", "person")
DATASETS = ("pacs", "pacs_64px_subset")


def load_pacs(dataset: str, image_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images N x H x W x 3 uint8, labels, domain index into ``PACS_DOMAINS``)."""
    if dataset == "pacs_64px_subset":
        path = require_file("pacs/pacs_64px_64per.npz",
                            "It ships in the zoo's shared offline data (set ZOO_DATA_DIR=../shared/data).")
        d = np.load(path)
        if tuple(str(n) for n in d["domain_names"]) != PACS_DOMAINS or d["x"].shape[1] != image_size:
            raise ValueError(f"{path} holds {tuple(d['domain_names'])} at {d['x'].shape[1]} px; expected "
                             f"{PACS_DOMAINS} at image_size={image_size}")
        return d["x"], d["y"].astype(np.int64), d["domain"].astype(np.int64)
    if dataset != "pacs":
        raise ValueError(f"unknown dataset {dataset!r}; use one of {DATASETS}")
    from PIL import Image

    how = ("Download PACS as DomainBed does (python -m domainbed.scripts.download: "
           "https://drive.google.com/uc?id=1JFr8f805nMUelQWWmfnJR3y4_SYoN5Pd, the zip's kfold/ renamed PACS/).")
    root = require_file("PACS/sketch", how).parent
    images, labels, domains = [], [], []
    for d, domain in enumerate(PACS_DOMAINS):
        for c, name in enumerate(PACS_CLASSES):
            for file in sorted((root / domain / name).iterdir()):
                image = Image.open(file).convert("RGB").resize((image_size, image_size), Image.BILINEAR)
                images.append(np.asarray(image))
                labels.append(c)
                domains.append(d)
    return np.stack(images), np.asarray(labels, np.int64), np.asarray(domains, np.int64)


class DomainBedView(View):
    """DomainBed's training augmentation on a uint8 HWC image (torchvision, seeded from the sample's ``rng``)."""

    def __init__(self, size: int, scale: tuple[float, float] = (0.7, 1.0), jitter: float = 0.3,
                 grayscale_p: float = 0.1):
        self.transform = T.Compose([T.RandomResizedCrop(size, scale=tuple(scale), antialias=True),
                                    T.RandomHorizontalFlip(), T.ColorJitter(jitter, jitter, jitter, jitter),
                                    T.RandomGrayscale(grayscale_p)])

    def __call__(self, image: np.ndarray, rng: random.Random) -> np.ndarray:
        with torch.random.fork_rng(devices=[]):  # torchvision draws from torch's global generator: seed it from rng
            torch.manual_seed(rng.getrandbits(63))
            chw = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
            return self.transform(chw).permute(1, 2, 0).numpy()


class DomainBalancedSampler(FixedLengthSampler):
    """Global batch ``t``: ``per_domain`` draws from each domain, domain after domain. Each domain's draws are
    concatenated random permutations of its items, seeded by (seed, epoch, domain). A rank's strided share holds
    ``per_domain / world_size`` items of every domain, so ``per_domain`` must split over the processes."""

    def __init__(self, domains: np.ndarray, per_domain: int, steps: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1):
        self.members = [torch.from_numpy(np.flatnonzero(domains == d)) for d in np.unique(domains)]
        self.per_domain, self.steps = per_domain, steps
        super().__init__(len(domains), per_domain * len(self.members) * steps, seed, rank, world_size)

    def global_draws(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        n = self.per_domain * self.steps
        draws = []
        for members in self.members:
            reps = -(-n // len(members))
            order = torch.cat([torch.randperm(len(members), generator=g) for _ in range(reps)])[:n]
            draws.append(members[order].view(self.steps, self.per_domain))
        idx = torch.stack(draws, 1).reshape(-1)  # step-major, then domain, then draw
        seeds = torch.randint(0, 2**62, (len(idx),), generator=g)
        return idx, seeds


class DomainGeneralizationDataModule(StreamDataModule):
    """Leave-one-domain-out PACS: the domain-balanced training stream, and two evaluation sets: the held-out
    domain (dataloader 0) and the training domains' validation split (dataloader 1).

    Args:
        dataset: ``pacs`` (full, DomainBed layout) or ``pacs_64px_subset`` (offline).
        test_domain: the held-out domain: art_painting, cartoon, photo or sketch.
        batch_size: global batch *per training domain* (DomainBed: 32), split over processes.
        image_size: training / evaluation resolution (DomainBed: 224; the offline subset is 64 px).
        holdout_fraction: share of each training domain kept for validation (DomainBed: 0.2).
        steps_per_epoch: batches per epoch (evaluation and checkpoint cadence come from the trainer).
        eval_batch_size: evaluation batch per process; also the test-time adaptation's batch.
        augment: DomainBed's training augmentation (``false``: the stored images).
        split_seed: seed of the training / validation split (DomainBed's ``trial_seed``).
    """

    def __init__(self, dataset: str = "pacs", test_domain: str = "art_painting", batch_size: int = 32,
                 image_size: int = 224, holdout_fraction: float = 0.2, steps_per_epoch: int = 100,
                 eval_batch_size: int = 64, augment: bool = True, num_workers: int = 4, split_seed: int = 0,
                 sampler_seed: int = 0, pin_memory: bool = True):
        super().__init__()
        if dataset not in DATASETS:
            raise ValueError(f"unknown dataset {dataset!r}; use one of {DATASETS}")
        if test_domain not in PACS_DOMAINS:
            raise ValueError(f"unknown test_domain {test_domain!r}; PACS domains: {PACS_DOMAINS}")
        if not 0 < holdout_fraction < 1:
            raise ValueError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}")
        self.dataset, self.test_domain, self.batch_size, self.image_size = dataset, test_domain, batch_size, image_size
        self.holdout_fraction, self.steps_per_epoch, self.eval_batch_size = holdout_fraction, steps_per_epoch, eval_batch_size
        self.augment, self.num_workers, self.split_seed = augment, num_workers, split_seed
        self.sampler_seed, self.pin_memory = sampler_seed, pin_memory
        self.images: np.ndarray | None = None
        self.mean = torch.tensor(IMAGENET_MEAN).view(1, -1, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(1, -1, 1, 1)

    @property
    def num_classes(self) -> int:
        return len(PACS_CLASSES)

    def setup(self, stage: str | None = None) -> None:
        if self.images is not None:
            return
        self.images, self.labels, self.domains = load_pacs(self.dataset, self.image_size)
        held_out = PACS_DOMAINS.index(self.test_domain)
        self.test_idx = np.flatnonzero(self.domains == held_out)
        train, val = [], []
        for d in sorted(set(self.domains.tolist()) - {held_out}):  # DomainBed's misc.split_dataset, per domain
            members = np.flatnonzero(self.domains == d)
            members = members[np.random.default_rng((self.split_seed, d)).permutation(len(members))]
            n_val = int(len(members) * self.holdout_fraction)
            val.append(members[:n_val])
            train.append(members[n_val:])
        self.train_idx, self.val_idx = np.sort(np.concatenate(train)), np.sort(np.concatenate(val))

    def _set(self, indices: np.ndarray, view: View) -> ViewDataset:
        return ViewDataset(self.images[indices], self.labels[indices], {"image": view})

    def train_dataloader(self):
        view = DomainBedView(self.image_size) if self.augment else Identity()
        rank, world = self.world()
        self.per_rank(self.batch_size)  # every process takes the same share of every domain
        domains = self.domains[self.train_idx]
        sampler = DomainBalancedSampler(domains, self.batch_size, self.steps_per_epoch, self.sampler_seed, rank, world)
        return self.stream(self._set(self.train_idx, view), self.batch_size * len(sampler.members),
                           seed=self.sampler_seed, sampler=sampler)

    def val_dataloader(self):
        return [self.eval_loader(self._set(self.test_idx, Identity()), self.eval_batch_size),
                self.eval_loader(self._set(self.val_idx, Identity()), self.eval_batch_size)]

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        return normalise_images(batch, self.mean, self.std)
