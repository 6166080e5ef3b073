"""Source/target segmentation data for domain adaptation: a labelled source stream and an unlabelled target
stream of fixed length per epoch, and the target's held-out frames for evaluation.

Each training step draws ``batch_size`` source and ``batch_size`` target crops (global over ranks), so the
batch is ``{"source": {"idx", "image", "label"}, "target": {"idx", "image", "label"}}`` with uint8 images and
uint8 labels (255 = ignore) normalised on the device with ImageNet statistics (DAFormer's ``img_norm_cfg``).
The target's labels ride along for diagnostics only (pseudo-label accuracy); methods never train on them.

The pipeline follows DAFormer's (``configs/_base_/datasets/uda_gta_to_cityscapes_512x512.py`` in lhoyer/MIC):
keep-ratio resize to the dataset's scale, random crop (source: up to 10 tries until no class covers more than
75 % of the crop), horizontal flip with p 0.5. Rare-class sampling (DAFormer, ``uda_dataset.py``) draws a
source class c with p ∝ softmax((1 - f_c) / T) over the class pixel frequencies f_c, then a source image
holding more than ``rare_class_min_pixels`` pixels of c, and re-crops up to 10 times until the crop holds more
than ``rare_class_min_pixels * rare_class_min_crop_ratio`` of them.

Datasets (``ZOO_DATA_DIR`` or ``data/``): ``gta5`` (``gta/images/*.png`` + ``gta/labels/*.png``, the raw
label-id PNGs), ``cityscapes`` (``cityscapes/leftImg8bit`` + ``cityscapes/gtFine`` ``*_labelIds.png``) with the
19-class protocol; the offline CamVid split by sequence: ``camvid_day`` (sequences 0006R0, 0016E5, Seq05VD, all
577 frames) and ``camvid_dusk`` (0001TP: the 62 frames of CamVid's train split to adapt on, the 62 of its test
split held out for evaluation), 11 classes.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from lightning.pytorch.utilities.combined_loader import CombinedLoader
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from zoo.core.data import FixedLengthSampler, StreamDataModule
from zoo.core.datasets import IMAGENET_MEAN, IMAGENET_STD, MissingDatasetError, require_file, data_root

__all__ = ["SegmentationSet", "load_segmentation_set", "SEGMENTATION_SETS", "SourceTargetDataModule",
           "RareClassSampler", "rare_class_probabilities", "CITYSCAPES_CLASSES", "CAMVID_CLASSES",
           "IMAGENET_MEAN", "IMAGENET_STD"]

IGNORE = 255

CITYSCAPES_CLASSES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
                      "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
                      "motorcycle", "bicycle")
CITYSCAPES_PALETTE = ((128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
                      (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
                      (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
                      (0, 80, 100), (0, 0, 230), (119, 11, 32))
# Cityscapes label ids (used by GTA5's and Cityscapes' raw label PNGs) -> the 19 train ids
_LABEL_ID_TO_TRAIN_ID = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
                         25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
CAMVID_CLASSES = ("sky", "building", "pole", "road", "pavement", "tree", "sign symbol", "fence", "car",
                  "pedestrian", "bicyclist")
CAMVID_PALETTE = ((128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0),
                  (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192))
CAMVID_DAY, CAMVID_DUSK = ("0006R0", "0016E5", "Seq05VD"), ("0001TP",)


@dataclass
class SegmentationSet:
    """Images and label maps of one domain and split; ``load(i)`` returns (HxWx3 uint8, HxW uint8, 255 ignore).

    ``scale`` is the (width, height) box DAFormer resizes into (keep-ratio) before cropping; None keeps the size.
    """
    name: str
    size: int
    load: Callable[[int], tuple[np.ndarray, np.ndarray]]
    classes: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    scale: tuple[int, int] | None = None
    class_pixel_counts: Callable[[], np.ndarray] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return self.size


def _label_lookup() -> np.ndarray:
    lut = np.full(256, IGNORE, np.uint8)
    for label_id, train_id in _LABEL_ID_TO_TRAIN_ID.items():
        lut[label_id] = train_id
    return lut


def _files(images: list[Path], labels: list[Path], name: str, scale, counts_cache: Path) -> SegmentationSet:
    lut = _label_lookup()

    def load(i: int):
        image = np.asarray(Image.open(images[i]).convert("RGB"))
        return image, lut[np.asarray(Image.open(labels[i]))]

    def counts() -> np.ndarray:  # per image and class, at full resolution (as DAFormer's sample_class_stats.json)
        if counts_cache.exists():
            return np.load(counts_cache)
        print(f"[zoo] counting class pixels of {len(labels)} {name} labels once (cached in {counts_cache})")
        table = np.stack([np.bincount(lut[np.asarray(Image.open(p))].ravel(), minlength=256)[:19]
                          for p in labels])
        np.save(counts_cache, table)
        return table

    return SegmentationSet(name, len(images), load, CITYSCAPES_CLASSES, CITYSCAPES_PALETTE, scale, counts)


def load_gta5(split: str) -> SegmentationSet:
    """GTA5 (Richter et al. 2016): all 24,966 frames are the source training set."""
    root = data_root() / "gta"
    images = sorted((root / "images").glob("*.png"))
    if split != "train" or not images:
        raise MissingDatasetError(
            f"GTA5 not found: expected {root.resolve()}/images/*.png and {root.resolve()}/labels/*.png.\n"
            "  Download the 10 image and label parts from https://download.visinf.tu-darmstadt.de/data/"
            "from_games/ and extract them there (only a train split exists).")
    return _files(images, [root / "labels" / p.name for p in images], "gta5", (1280, 720),
                  root / "zoo_class_pixel_counts.npy")


def load_cityscapes(split: str) -> SegmentationSet:
    """Cityscapes fine annotations: 2,975 train frames (target) and the 500 val frames (evaluation)."""
    root = data_root() / "cityscapes"
    images = sorted((root / "leftImg8bit" / split).glob("*/*_leftImg8bit.png"))
    if not images:
        raise MissingDatasetError(
            f"Cityscapes not found: expected {root.resolve()}/leftImg8bit/{split}/<city>/*_leftImg8bit.png and "
            f"{root.resolve()}/gtFine/{split}/<city>/*_gtFine_labelIds.png.\n"
            "  Register at https://www.cityscapes-dataset.com and extract leftImg8bit_trainvaltest.zip and "
            "gtFine_trainvaltest.zip there.")
    labels = [root / "gtFine" / split / p.parent.name / p.name.replace("leftImg8bit", "gtFine_labelIds")
              for p in images]
    return _files(images, labels, "cityscapes", (1024, 512), root / f"zoo_class_pixel_counts_{split}.npy")


def _camvid(sequences: tuple[str, ...], splits: tuple[str, ...], name: str) -> SegmentationSet:
    path = require_file("camvid/camvid_96x128.npz",
                    "It ships in the zoo's shared offline data (set ZOO_DATA_DIR=../shared/data).")
    d = np.load(path)
    images, labels = [], []
    for split in splits:
        keep = np.array([str(n).split("_")[0] in sequences for n in d[f"names_{split}"]])
        images.append(d[f"x_{split}"][keep])
        labels.append(d[f"y_{split}"][keep])
    images, labels = np.concatenate(images), np.concatenate(labels)
    labels = np.where(labels == 11, IGNORE, labels).astype(np.uint8)  # CamVid's void class is ignored

    def counts() -> np.ndarray:
        return np.stack([np.bincount(y.ravel(), minlength=256)[:len(CAMVID_CLASSES)] for y in labels])

    return SegmentationSet(name, len(images), lambda i: (images[i], labels[i]), CAMVID_CLASSES, CAMVID_PALETTE,
                           None, counts)


def load_camvid_day(split: str) -> SegmentationSet:
    """Daytime CamVid sequences (all their frames, whichever CamVid split they are in): the source domain."""
    return _camvid(CAMVID_DAY, ("train", "val", "test"), "camvid_day")


def load_camvid_dusk(split: str) -> SegmentationSet:
    """Dusk sequence 0001TP: CamVid's train frames to adapt on, its test frames held out for evaluation."""
    return _camvid(CAMVID_DUSK, ("train",) if split == "train" else ("test",), "camvid_dusk")


SEGMENTATION_SETS = {"gta5": load_gta5, "cityscapes": load_cityscapes, "camvid_day": load_camvid_day,
                     "camvid_dusk": load_camvid_dusk}


def load_segmentation_set(name: str, split: str) -> SegmentationSet:
    if name not in SEGMENTATION_SETS:
        raise ValueError(f"unknown segmentation dataset {name!r}; available: {sorted(SEGMENTATION_SETS)}")
    return SEGMENTATION_SETS[name](split)


# ------------------------------------------------------------------------------------------- sampling
def rare_class_probabilities(class_pixels: np.ndarray, temperature: float) -> np.ndarray:
    """DAFormer's rare-class sampling distribution: softmax((1 - f_c) / T) over the classes present."""
    present = class_pixels > 0
    freq = class_pixels[present] / class_pixels[present].sum()
    probs = np.zeros(len(class_pixels))
    probs[present] = torch.softmax(torch.from_numpy(1 - freq) / temperature, 0).numpy()
    return probs


class RareClassSampler(FixedLengthSampler):
    """A :class:`FixedLengthSampler` whose draws follow rare-class sampling; yields (index, seed, class).

    Classes without any image above ``min_pixels`` pixels cannot be drawn (DAFormer asserts there is none).
    """

    def __init__(self, pixel_counts: np.ndarray, temperature: float, min_pixels: int, samples_per_epoch: int,
                 seed: int = 0, rank: int = 0, world_size: int = 1):
        super().__init__(len(pixel_counts), samples_per_epoch, seed, rank, world_size)
        eligible = pixel_counts > min_pixels
        probs = rare_class_probabilities(pixel_counts.sum(0), temperature) * eligible.any(0)
        self.class_probs = torch.from_numpy(probs / probs.sum())
        self.images_with_class = [torch.from_numpy(np.flatnonzero(eligible[:, c])) for c in range(eligible.shape[1])]

    def global_draws(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        classes = torch.multinomial(self.class_probs, self.samples_per_epoch, replacement=True, generator=g)
        picks = torch.rand(self.samples_per_epoch, generator=g, dtype=torch.float64)
        idx = torch.stack([self.images_with_class[c][int(u * len(self.images_with_class[c]))]
                           for c, u in zip(classes.tolist(), picks.tolist())])
        seeds = torch.randint(0, 2**62, (self.samples_per_epoch,), generator=g)
        return idx, seeds, classes

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        idx, seeds, classes = (t[self.rank:: self.world_size] for t in self.global_draws(self.epoch))
        skip, self._skip = self._skip, 0
        return iter(zip(idx[skip:].tolist(), seeds[skip:].tolist(), classes[skip:].tolist()))


# ------------------------------------------------------------------------------------------- pipeline
def _rescale(image: np.ndarray, label: np.ndarray, scale: tuple[int, int] | None):
    """mmcv's keep-ratio rescale into the (long, short) box; bilinear for images, nearest for labels."""
    if scale is None:
        return image, label
    h, w = label.shape
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    size = (int(w * factor + 0.5), int(h * factor + 0.5))
    return (np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR)),
            np.asarray(Image.fromarray(label).resize(size, Image.NEAREST)))


def _crop_box(shape, crop_size, rng: random.Random):
    margin_h, margin_w = max(shape[0] - crop_size[0], 0), max(shape[1] - crop_size[1], 0)
    top, left = rng.randint(0, margin_h), rng.randint(0, margin_w)
    return slice(top, top + crop_size[0]), slice(left, left + crop_size[1])


def random_crop(label: np.ndarray, crop_size, rng: random.Random, cat_max_ratio: float = 1.0):
    """mmseg's RandomCrop box: with ``cat_max_ratio`` < 1, up to 10 tries until no class exceeds that share."""
    box = _crop_box(label.shape, crop_size, rng)
    if cat_max_ratio < 1.0:
        for _ in range(10):
            counts = np.bincount(label[box].ravel(), minlength=256)[:IGNORE]
            if len(counts[counts > 0]) > 1 and counts.max() / counts.sum() < cat_max_ratio:
                break
            box = _crop_box(label.shape, crop_size, rng)
    return box


class CropDataset(Dataset):
    """Training crops of one domain; an item key is (index, seed) or, under rare-class sampling, (index, seed, c)."""

    def __init__(self, data: SegmentationSet, crop_size: tuple[int, int], cat_max_ratio: float = 1.0,
                 min_class_pixels: float = 0.0):
        self.data, self.crop_size, self.cat_max_ratio = data, tuple(crop_size), cat_max_ratio
        self.min_class_pixels = min_class_pixels

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, key) -> dict:
        index, seed, *rare = key if isinstance(key, tuple) else (key, key)
        rng = random.Random(seed)
        image, label = _rescale(*self.data.load(index), self.data.scale)
        box = random_crop(label, self.crop_size, rng, self.cat_max_ratio)
        for _ in range(10 if rare and self.min_class_pixels > 0 else 0):
            if (label[box] == rare[0]).sum() > self.min_class_pixels:
                break
            box = random_crop(label, self.crop_size, rng, self.cat_max_ratio)
        image, label = image[box], label[box]
        if rng.random() < 0.5:
            image, label = image[:, ::-1], label[:, ::-1]
        return {"idx": index, "image": torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1),
                "label": torch.from_numpy(np.ascontiguousarray(label))}


class EvalDataset(Dataset):
    """Whole evaluation frames resized to the dataset's scale; labels stay at their original resolution."""

    def __init__(self, data: SegmentationSet):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict:
        image, label = self.data.load(index)
        image = _rescale(image, label, self.data.scale)[0]
        return {"idx": index, "image": torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1),
                "label": torch.from_numpy(np.ascontiguousarray(label))}


class SourceTargetDataModule(StreamDataModule):
    """Labelled source + unlabelled target training streams (``CombinedLoader({"source", "target"})``) and the
    target's held-out frames for evaluation.

    Args:
        source / target: names in ``SEGMENTATION_SETS`` (target is evaluated on its ``val`` split).
        batch_size: global source batch per step; the target batch has the same size (DAFormer: 2 + 2).
        steps_per_epoch: optimizer steps per epoch (validation and checkpoint cadence).
        crop_size: (height, width) of the training crops (DAFormer: 512x512); larger than the image = no crop.
        cat_max_ratio: source crops are retried until no class covers this share (0.75; 1 disables).
        rare_class_temperature: rare-class sampling temperature T (DAFormer 0.01); None samples uniformly.
        rare_class_min_pixels, rare_class_min_crop_ratio: DAFormer's 3000 and 0.5.
        future_batches: extra source/target batches drawn per step (FST-W's look-ahead data); each stream then
            yields ``(1 + future_batches) * batch_size`` crops, the real batch first.
    """

    def __init__(self, source: str = "gta5", target: str = "cityscapes", batch_size: int = 2,
                 steps_per_epoch: int = 4000, crop_size: tuple[int, int] = (512, 512), cat_max_ratio: float = 0.75,
                 rare_class_temperature: float | None = 0.01, rare_class_min_pixels: int = 3000,
                 rare_class_min_crop_ratio: float = 0.5, future_batches: int = 0, eval_batch_size: int = 1,
                 num_workers: int = 4, sampler_seed: int = 0, pin_memory: bool = True):
        super().__init__()
        self.source, self.target, self.batch_size, self.steps_per_epoch = source, target, batch_size, steps_per_epoch
        self.crop_size, self.cat_max_ratio = tuple(crop_size), cat_max_ratio
        self.rare_class_temperature, self.rare_class_min_pixels = rare_class_temperature, rare_class_min_pixels
        self.rare_class_min_crop_ratio, self.future_batches = rare_class_min_crop_ratio, future_batches
        self.eval_batch_size, self.num_workers, self.sampler_seed = eval_batch_size, num_workers, sampler_seed
        self.pin_memory = pin_memory
        self.dataset = f"{source}->{target}"  # the W&B tag
        self.sets: dict[str, SegmentationSet] | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.sets is None:
            self.sets = {"source": load_segmentation_set(self.source, "train"),
                         "target": load_segmentation_set(self.target, "train"),
                         "val": load_segmentation_set(self.target, "val")}
        self.mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

    @property
    def classes(self) -> tuple[str, ...]:
        if self.sets is None:
            self.setup()
        return self.sets["val"].classes

    @property
    def palette(self):
        return self.sets["val"].palette

    def _stream(self, domain: str, stream_seed: int) -> DataLoader:
        step_batch = self.batch_size * (1 + self.future_batches)
        data, seed = self.sets[domain], self.sampler_seed * 2 + stream_seed
        self.per_rank(self.batch_size)  # the real batch itself must split over the processes
        sampler, min_pixels = None, 0.0
        if domain == "source" and self.rare_class_temperature is not None:
            rank, world = self.world()
            sampler = RareClassSampler(data.class_pixel_counts(), self.rare_class_temperature,
                                       self.rare_class_min_pixels, step_batch * self.steps_per_epoch, seed, rank, world)
            min_pixels = self.rare_class_min_pixels * self.rare_class_min_crop_ratio
        dataset = CropDataset(data, self.crop_size, self.cat_max_ratio if domain == "source" else 1.0, min_pixels)
        return self.stream(dataset, step_batch, seed, sampler=sampler)

    def train_dataloader(self):
        return CombinedLoader({"source": self._stream("source", 0), "target": self._stream("target", 1)},
                              mode="min_size")

    def val_dataloader(self):
        return self.eval_loader(EvalDataset(self.sets["val"]), self.eval_batch_size)

    test_dataloader = val_dataloader

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Images: uint8 -> normalised float on the device; labels: uint8 -> int64."""
        def convert(item):
            if isinstance(item, dict):
                return {k: convert(v) for k, v in item.items()}
            if isinstance(item, torch.Tensor) and item.dtype == torch.uint8:
                if item.ndim == 4:
                    return (item.float() - self.mean.to(item.device)) / self.std.to(item.device)
                return item.long()
            return item
        return convert(batch)
