"""Image manipulation data for WSCL: a training stream of images with IMAGE-LEVEL labels only, and evaluation sets
with ground-truth masks.

Training sources (``train_source``):
- ``casia2`` (the paper's): CASIA v2.0 under ``<ZOO_DATA_DIR>/casia2/{Au,Tp}/`` (authentic 0, tampered 1; masks are
  not read). Random ``crop_size`` crops (official ``crop_to_smallest_collate_fn`` at ``input_size`` 224), flips.
- ``coco_splices`` (offline stand-in): real splices made from the real photos of ``coco_mini``. Every draw takes
  a random crop of a real image; with probability ``manipulated_fraction`` one real COCO object (its instance mask),
  cut from another real image (splicing) or from the same one (copy-move, ``copy_move_fraction``), is rescaled to
  cover a log-uniform fraction ``area_range`` of the crop and pasted at a random place. The label is 1 exactly when
  pixels were pasted (at least ``area_range[0] / 2`` of the crop). ``splice_shape: polygon`` pastes random polygons.
Both sources flip and, with probability ``jpeg_prob``, re-encode every training image (authentic and manipulated
alike, so compression is no cue) at a quality drawn from ``jpeg_quality`` (official albumentations
``ImageCompression(p=0.5)``, quality 99-100).

Training items are ``{"idx", "image", "label"}``: the splice mask exists only inside :meth:`SpliceDataset.make`,
never in a training batch. Evaluation items add ``"mask"`` (uint8, H x W) and keep the image's own size (batch 1,
as the official evaluation), tampered and authentic images interleaved.

Evaluation sets (``eval_set``, a folder under the data root): ``tampered/*``, ``masks/<stem>_gt.png``,
``authentic/*`` — ``casia1_samples`` (shared data: 36 + 36 CASIA v1.0 images), or the full CASIA v1.0 prepared the
same way (``casia1``: images from CASIA, masks from Pham et al.'s ``CASIA 1.0 groundtruth``).
"""
from __future__ import annotations

import io
import json
import math
import random
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from zoo.core.data import StreamDataModule
from zoo.core.datasets import require_file

__all__ = ["CasiaTrainDataset", "ManipulationDataModule", "MaskedEvalDataset", "SpliceDataset"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")


def _read(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _random_crop(image: np.ndarray, size: int, rng: random.Random) -> np.ndarray:
    """A ``size`` x ``size`` crop; an image with a shorter side is first resized up to ``size`` (bilinear)."""
    h, w = image.shape[:2]
    if min(h, w) < size:
        scale = size / min(h, w)
        image = _resize(image, (max(size, round(h * scale)), max(size, round(w * scale))))
        h, w = image.shape[:2]
    top, left = rng.randint(0, h - size), rng.randint(0, w - size)
    return image[top : top + size, left : left + size]


def _resize(array: np.ndarray, size_hw: tuple[int, int], nearest: bool = False) -> np.ndarray:
    resample = Image.NEAREST if nearest else Image.BILINEAR
    return np.asarray(Image.fromarray(array).resize((size_hw[1], size_hw[0]), resample))


def _finish(image: np.ndarray, rng: random.Random, flip: bool, jpeg_prob: float,
            jpeg_quality: tuple[int, int]) -> torch.Tensor:
    """Horizontal flip and optional JPEG re-encoding, the same for every training image; uint8 CHW."""
    if flip and rng.random() < 0.5:
        image = image[:, ::-1]
    if rng.random() < jpeg_prob:
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="JPEG",
                                                          quality=rng.randint(*jpeg_quality))
        image = np.asarray(Image.open(buffer).convert("RGB"))
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


class SpliceDataset(Dataset):
    """Real splices and copy-moves of real COCO objects into real COCO photos (``coco_mini``); see the module
    docstring. Item ``(index, seed)``: target photo ``index``, every random choice drawn from ``seed``."""

    def __init__(self, crop_size: int = 224, manipulated_fraction: float = 0.5, copy_move_fraction: float = 0.5,
                 splice_shape: Literal["object", "polygon"] = "object", area_range: tuple[float, float] = (0.01, 0.3),
                 flip: bool = True, jpeg_prob: float = 0.5, jpeg_quality: tuple[int, int] = (99, 100)):
        how = "the shared offline data (../shared/data/coco_mini: COCO-2017 images with instance maps)"
        maps_path = require_file("coco_mini/instance_maps.npz", how)
        root = maps_path.parent
        self.paths, self.keys = [], []
        for split in ("train2017", "val2017"):
            info = json.loads(require_file(f"coco_mini/annotations/instances_{split}.json", how).read_text())
            for image in sorted(info["images"], key=lambda im: im["id"]):
                self.paths.append(root / image["file_name"])
                self.keys.append(f"{split}_{image['id']}")
        self.instance_maps = dict(np.load(maps_path))
        if splice_shape not in ("object", "polygon"):
            raise ValueError(f"splice_shape must be 'object' or 'polygon', not {splice_shape!r}")
        if not 0 < area_range[0] <= area_range[1] < 1:
            raise ValueError(f"area_range must satisfy 0 < low <= high < 1, not {area_range}")
        self.crop_size, self.manipulated_fraction, self.copy_move_fraction = crop_size, manipulated_fraction, copy_move_fraction
        self.splice_shape, self.area_range = splice_shape, tuple(area_range)
        self.flip, self.jpeg_prob, self.jpeg_quality = flip, jpeg_prob, tuple(jpeg_quality)

    def __len__(self) -> int:
        return len(self.paths)

    def _donor_region(self, donor: int, rng: random.Random) -> tuple[np.ndarray, np.ndarray]:
        """(pixels, mask) of the bounding box of a region of photo ``donor``: one of its COCO objects, or a polygon."""
        image = _read(self.paths[donor])
        instances = self.instance_maps[self.keys[donor]]
        ids = [i for i in np.unique(instances) if 0 < i < 255 and (instances == i).sum() >= 64]
        if self.splice_shape == "object" and ids:
            mask = instances == rng.choice(ids)
        else:
            h, w = instances.shape
            cy, cx, r = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w, rng.uniform(0.15, 0.3) * min(h, w)
            angles = sorted(rng.uniform(0, 2 * math.pi) for _ in range(rng.randint(3, 8)))
            points = [(cx + r * rng.uniform(0.5, 1) * math.cos(a), cy + r * rng.uniform(0.5, 1) * math.sin(a))
                      for a in angles]
            canvas = Image.new("L", (w, h))
            ImageDraw.Draw(canvas).polygon(points, fill=1)
            mask = np.asarray(canvas).astype(bool)
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
        return image[box], mask[box]

    def make(self, index: int, seed: int) -> tuple[torch.Tensor, int, np.ndarray]:
        """(image uint8 CHW, label, mask H x W bool): the mask is for tests and inspection, never for training."""
        rng = random.Random(seed)
        size = self.crop_size
        target = _random_crop(_read(self.paths[index]), size, rng).copy()
        mask = np.zeros((size, size), dtype=bool)
        if rng.random() < self.manipulated_fraction:
            copy_move = rng.random() < self.copy_move_fraction
            donor = index if copy_move else rng.choice([i for i in range(len(self)) if i != index])
            pixels, region = self._donor_region(donor, rng)
            low, high = self.area_range
            fraction = math.exp(rng.uniform(math.log(low), math.log(high)))
            scale = min(math.sqrt(fraction * size * size / region.sum()), size / max(region.shape))
            shape = (max(1, round(region.shape[0] * scale)), max(1, round(region.shape[1] * scale)))
            pixels, region = _resize(pixels, shape), _resize(region.astype(np.uint8), shape, nearest=True) > 0
            if region.sum() >= low / 2 * size * size:
                top, left = rng.randint(0, size - shape[0]), rng.randint(0, size - shape[1])
                window = (slice(top, top + shape[0]), slice(left, left + shape[1]))
                target[window][region] = pixels[region]
                mask[window] = region
        label = int(mask.any())
        if self.flip and rng.random() < 0.5:
            target, mask = target[:, ::-1], mask[:, ::-1]
        return _finish(target, rng, False, self.jpeg_prob, self.jpeg_quality), label, mask

    def __getitem__(self, key) -> dict:
        index, seed = key if isinstance(key, tuple) else (key, key)
        image, label, _ = self.make(index, seed)
        return {"idx": index, "image": image, "label": label}


class CasiaTrainDataset(Dataset):
    """CASIA v2.0 for weakly-supervised training: ``casia2/Au/*`` (label 0) and ``casia2/Tp/*`` (label 1), random
    crops and flips; only image-level labels (its masks are not read)."""

    def __init__(self, crop_size: int = 224, flip: bool = True, jpeg_prob: float = 0.5,
                 jpeg_quality: tuple[int, int] = (99, 100)):
        how = ("download CASIA v2.0 (Dong et al., ChinaSIP 2013) and put its Au/ and Tp/ folders under "
               "<ZOO_DATA_DIR>/casia2/")
        root = require_file("casia2/Tp", how).parent
        require_file("casia2/Au", how)
        self.items = [(path, label) for label, folder in ((0, "Au"), (1, "Tp"))
                      for path in sorted((root / folder).iterdir()) if path.suffix.lower() in IMAGE_SUFFIXES]
        self.crop_size, self.flip, self.jpeg_prob, self.jpeg_quality = crop_size, flip, jpeg_prob, tuple(jpeg_quality)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key) -> dict:
        index, seed = key if isinstance(key, tuple) else (key, key)
        rng = random.Random(seed)
        path, label = self.items[index]
        image = _random_crop(_read(path), self.crop_size, rng)
        return {"idx": index, "image": _finish(image, rng, self.flip, self.jpeg_prob, self.jpeg_quality), "label": label}


class MaskedEvalDataset(Dataset):
    """``tampered/*`` with ``masks/<stem>_gt.png`` (label 1) and ``authentic/*`` (label 0, empty mask), interleaved
    (tampered 0, authentic 0, tampered 1, ...), each at its own size."""

    def __init__(self, name: str = "casia1_samples"):
        how = (f"the evaluation set {name!r}: tampered/, masks/<stem>_gt.png and authentic/ (casia1_samples ships "
               f"in ../shared/data; for full CASIA v1.0 use the CASIA images with Pham et al.'s ground-truth masks)")
        root = require_file(f"{name}/tampered", how).parent
        listed = lambda folder: sorted(p for p in (root / folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        tampered = [(p, root / "masks" / f"{p.stem}_gt.png") for p in listed("tampered")]
        authentic = [(p, None) for p in listed("authentic")]
        self.items = [item for pair in zip(tampered, authentic) for item in pair]
        longer = tampered[len(authentic):] + authentic[len(tampered):]
        self.items += longer

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        path, mask_path = self.items[index]
        image = _read(path)
        mask = (np.asarray(Image.open(mask_path).convert("L")) > 127) if mask_path else np.zeros(image.shape[:2], bool)
        return {"idx": index, "image": torch.from_numpy(image.copy()).permute(2, 0, 1),
                "label": int(mask_path is not None), "mask": torch.from_numpy(mask.astype(np.uint8))}


class ManipulationDataModule(StreamDataModule):
    """One training stream of ``batch_size`` (global) images with image-level labels; evaluation on ``eval_set``
    at batch 1 per process (images keep their size). Arguments: see the module docstring and the datasets."""

    def __init__(self, train_source: Literal["casia2", "coco_splices"] = "casia2", eval_set: str = "casia1",
                 crop_size: int = 224, batch_size: int = 36, steps_per_epoch: int = 351,
                 manipulated_fraction: float = 0.5, copy_move_fraction: float = 0.5,
                 splice_shape: Literal["object", "polygon"] = "object", area_range: tuple[float, float] = (0.01, 0.3),
                 flip: bool = True, jpeg_prob: float = 0.5, jpeg_quality: tuple[int, int] = (99, 100),
                 num_workers: int = 4, sampler_seed: int = 0, pin_memory: bool = True):
        super().__init__()
        if train_source not in ("casia2", "coco_splices"):
            raise ValueError(f"train_source must be 'casia2' or 'coco_splices', not {train_source!r}")
        self.train_source, self.eval_set, self.crop_size, self.batch_size = train_source, eval_set, crop_size, batch_size
        self.steps_per_epoch, self.num_workers, self.sampler_seed, self.pin_memory = (
            steps_per_epoch, num_workers, sampler_seed, pin_memory)
        self.splice_args = dict(manipulated_fraction=manipulated_fraction, copy_move_fraction=copy_move_fraction,
                                splice_shape=splice_shape, area_range=tuple(area_range))
        self.finish_args = dict(flip=flip, jpeg_prob=jpeg_prob, jpeg_quality=tuple(jpeg_quality))
        self.train_set = self.eval_dataset = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        if self.train_source == "coco_splices":
            self.train_set = SpliceDataset(self.crop_size, **self.splice_args, **self.finish_args)
        else:
            self.train_set = CasiaTrainDataset(self.crop_size, **self.finish_args)
        self.eval_dataset = MaskedEvalDataset(self.eval_set)

    def train_dataloader(self):
        return self.stream(self.train_set, self.batch_size, self.sampler_seed)

    def val_dataloader(self):
        return self.eval_loader(self.eval_dataset, batch_size=1)
