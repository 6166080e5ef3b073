"""Semi-supervised detection data: labeled images with boxes, unlabeled images as a (weak, strong) pair.

Datasets (COCO json, resolved under ``ZOO_DATA_DIR`` and then the shared offline folder):
- ``coco2017``: ``coco/annotations/instances_{train,val}2017.json``, ``coco/{train,val}2017/``; the labeled part is
  the official split rule (``tools/dataset/semi_coco.py``: ``np.random.seed(fold)``, ``labeled_percent`` % of the
  images), the rest is unlabeled, val2017 is the test set.
- ``raccoon``: 160 train / 40 test (its ``split`` field); ``coco128``: 80 classes, no split of its own, so every
  4th image (32) is held out as the test set.

Streams follow the zoo's protocol: ``FixedLengthSampler`` draws ``batch_size`` labeled and
``uratio * batch_size`` unlabeled images per step over all processes (official 1:4), shards them, reshuffles per
epoch and fast-forwards on resume. Images stay uint8 until the device; batches are padded to a multiple of 32.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.combined_loader import CombinedLoader
from PIL import Image
from torch.utils.data import Dataset

from zoo.core.data import StreamDataModule
from zoo.core.datasets import IMAGENET_MEAN, IMAGENET_STD, MissingDatasetError, data_root, shared_root  # official img_norm_cfg

from .transforms import LABELED, STRONG, WEAK, Augment, resize_for_test

__all__ = ["Record", "load_detection_set", "DetectionSemiDataModule", "collate", "IMAGENET_MEAN", "IMAGENET_STD"]

SHIPPED = "It ships in the zoo's shared offline data (ZOO_DATA_DIR=../shared/data)."


@dataclass
class Record:
    path: Path
    boxes: np.ndarray    # (K, 4) xyxy pixels, float32
    labels: np.ndarray   # (K,) contiguous class index
    area: np.ndarray     # (K,) COCO area (decides small / medium / large)
    iscrowd: np.ndarray  # (K,)


def _find(relative: str, how: str) -> Path:
    for root in (data_root(), shared_root()):
        if (root / relative).exists():
            return root / relative
    raise MissingDatasetError(f"dataset file not found: {(data_root() / relative).resolve()}\n  {how}\n"
                              f"  (searched ZOO_DATA_DIR={data_root()} and {shared_root()})")


def _coco_records(ann_file: Path, image_dir: Path, category_ids: list[int] | None = None):
    coco = json.loads(ann_file.read_text())
    category_ids = category_ids or sorted(c["id"] for c in coco["categories"])
    names = {c["id"]: c["name"] for c in coco["categories"]}
    to_label = {cid: i for i, cid in enumerate(category_ids)}
    per_image = {im["id"]: [] for im in coco["images"]}
    for a in coco["annotations"]:
        if a["bbox"][2] > 0 and a["bbox"][3] > 0:
            per_image[a["image_id"]].append(a)
    records, extras = [], []
    for im in coco["images"]:
        anns = per_image[im["id"]]
        xywh = np.array([a["bbox"] for a in anns], np.float32).reshape(-1, 4)
        records.append(Record(image_dir / im["file_name"], np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1),
                              np.array([to_label[a["category_id"]] for a in anns], np.int64),
                              np.array([a.get("area", a["bbox"][2] * a["bbox"][3]) for a in anns], np.float32),
                              np.array([a.get("iscrowd", 0) for a in anns], np.int64)))
        extras.append(im)
    return records, extras, tuple(names[c] for c in category_ids)


def load_detection_set(name: str) -> tuple[list[Record], list[Record], tuple[str, ...]]:
    """(train records, test records, class names)."""
    if name == "raccoon":
        ann = _find("raccoon/annotations.json", SHIPPED)
        records, images, classes = _coco_records(ann, ann.parent)
        split = [im["split"] for im in images]
        return ([r for r, s in zip(records, split) if s == "train"],
                [r for r, s in zip(records, split) if s == "test"], classes)
    if name == "coco128":
        ann = _find("coco128/instances_coco128.json", SHIPPED)
        records, _, classes = _coco_records(ann, ann.parent)
        return [r for i, r in enumerate(records) if i % 4 != 3], records[3::4], classes
    if name == "coco2017":
        how = ("Download COCO 2017 from https://cocodataset.org (train2017.zip, val2017.zip, "
               "annotations_trainval2017.zip) and unzip into $ZOO_DATA_DIR/coco/ (annotations/, train2017/, val2017/).")
        train_ann = _find("coco/annotations/instances_train2017.json", how)
        val_ann = _find("coco/annotations/instances_val2017.json", how)
        root = train_ann.parents[1]
        for folder in ("train2017", "val2017"):
            _find(f"coco/{folder}", how)
        train, _, classes = _coco_records(train_ann, root / "train2017")
        test, _, _ = _coco_records(val_ann, root / "val2017")
        return train, test, classes
    raise ValueError(f"unknown detection dataset {name!r}; use raccoon, coco128 or coco2017")


def labeled_split(num_images: int, percent: float, fold: int) -> np.ndarray:
    """The official rule: ``np.random.seed(fold); choice(range(n), int(percent / 100 * n), replace=False)``."""
    np.random.seed(fold)
    return np.sort(np.random.choice(range(num_images), size=int(percent / 100.0 * num_images), replace=False))


def _load(record: Record) -> np.ndarray:
    return np.asarray(Image.open(record.path).convert("RGB"))


def _chw(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)  # a writable copy


class LabeledSet(Dataset):
    def __init__(self, records: list[Record], augment: Augment):
        self.records, self.augment = records, augment

    def __len__(self):
        return len(self.records)

    def __getitem__(self, key):
        index, seed = key
        r = self.records[index]
        keep = r.iscrowd == 0                   # crowd regions are not training targets (mmdet: ignored)
        image, boxes, _ = self.augment(_load(r), r.boxes[keep], random.Random(seed))
        return {"idx": index, "image": _chw(image), "boxes": torch.from_numpy(boxes),
                "labels": torch.from_numpy(r.labels[keep])}


class UnlabeledSet(Dataset):
    """Weak and strong views of one image with their matrices; true boxes ride along for diagnostics only."""

    def __init__(self, records: list[Record], weak: Augment, strong: Augment):
        self.records, self.weak, self.strong = records, weak, strong

    def __len__(self):
        return len(self.records)

    def __getitem__(self, key):
        index, seed = key
        r, rng = self.records[index], random.Random(seed)
        image, keep = _load(r), r.iscrowd == 0
        weak, _, weak_matrix = self.weak(image, r.boxes[keep], rng)
        strong, boxes, strong_matrix = self.strong(image, r.boxes[keep], rng)
        return {"idx": index, "weak": _chw(weak), "strong": _chw(strong),
                "weak_matrix": torch.from_numpy(weak_matrix).float(),
                "strong_matrix": torch.from_numpy(strong_matrix).float(),
                "boxes": torch.from_numpy(boxes), "labels": torch.from_numpy(r.labels[keep])}


class TestSet(Dataset):
    """Images resized to the test scale; targets stay in original pixels (COCO evaluation there)."""

    def __init__(self, records: list[Record], short_side: int, max_long_side: int):
        self.records, self.short_side, self.max_long_side = records, short_side, max_long_side

    def __len__(self):
        return len(self.records)

    def __getitem__(self, index):
        r = self.records[index]
        image, scale = resize_for_test(_load(r), self.short_side, self.max_long_side)
        return {"idx": index, "image": _chw(image), "scale": scale, "boxes": torch.from_numpy(r.boxes),
                "labels": torch.from_numpy(r.labels), "area": torch.from_numpy(r.area),
                "iscrowd": torch.from_numpy(r.iscrowd)}


def collate(items: list[dict], size_divisor: int = 32) -> dict:
    """Pads images (keys ``image``, ``weak``, ``strong``) bottom-right with 0 to a shared size divisible by 32 and
    records each image's own size as ``<key>_size`` (H, W); box tensors stay lists (variable counts)."""
    batch = {}
    for key in items[0]:
        values = [item[key] for item in items]
        if key in ("image", "weak", "strong"):
            h = -(-max(v.shape[1] for v in values) // size_divisor) * size_divisor
            w = -(-max(v.shape[2] for v in values) // size_divisor) * size_divisor
            batch[key] = torch.stack([F.pad(v, (0, w - v.shape[2], 0, h - v.shape[1])) for v in values])
            batch[f"{key}_size"] = torch.tensor([tuple(v.shape[1:]) for v in values])
        elif isinstance(values[0], torch.Tensor) and key.endswith("matrix"):
            batch[key] = torch.stack(values)
        elif isinstance(values[0], torch.Tensor):
            batch[key] = values
        else:
            batch[key] = torch.tensor(values)
    return batch


class DetectionSemiDataModule(StreamDataModule):
    """Labeled + unlabeled detection streams (``CombinedLoader({"lb", "ulb"})``) and the test set.

    Args:
        dataset: ``raccoon``, ``coco128`` or ``coco2017``.
        labeled_percent: share of the training images that keep their boxes (official split rule, ``fold``).
        batch_size: labeled images per step, all processes together; uratio: unlabeled = ``uratio * batch_size``
            (0: supervised only).
        steps_per_epoch: optimizer steps per epoch (validation and checkpoint cadence).
        train_short_side / max_long_side: random resize range of training views (official 400-1200 / 1333).
        test_short_side / test_max_long_side: test scale (official 800 / 1333).
    """

    def __init__(self, dataset: str = "coco2017", labeled_percent: float = 10.0, fold: int = 1,
                 batch_size: int = 8, uratio: int = 4, steps_per_epoch: int = 1000,
                 train_short_side: tuple[int, int] = (400, 1200), max_long_side: int = 1333,
                 test_short_side: int = 800, test_max_long_side: int = 1333, eval_batch_size: int = 8,
                 num_workers: int = 4, sampler_seed: int = 0, pin_memory: bool = True):
        super().__init__()
        self.dataset, self.labeled_percent, self.fold = dataset, labeled_percent, fold
        self.batch_size, self.uratio, self.steps_per_epoch = batch_size, uratio, steps_per_epoch
        self.train_short_side, self.max_long_side = tuple(train_short_side), max_long_side
        self.test_short_side, self.test_max_long_side = test_short_side, test_max_long_side
        self.eval_batch_size, self.num_workers = eval_batch_size, num_workers
        self.sampler_seed, self.pin_memory = sampler_seed, pin_memory
        self.train_records: list[Record] | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_records is not None:
            return
        self.train_records, self.test_records, self.classes = load_detection_set(self.dataset)
        chosen = labeled_split(len(self.train_records), self.labeled_percent, self.fold)
        is_labeled = np.zeros(len(self.train_records), bool)
        is_labeled[chosen] = True
        self.labeled = [r for r, lab in zip(self.train_records, is_labeled)
                        if lab and (r.iscrowd == 0).any()]  # mmdet filter_empty_gt for the labeled part
        self.unlabeled = [r for r, lab in zip(self.train_records, is_labeled) if not lab]
        self.mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

    @property
    def num_classes(self) -> int:
        self.setup()
        return len(self.classes)

    def train_dataloader(self):
        short, long = self.train_short_side, self.max_long_side
        labeled = LabeledSet(self.labeled, Augment(LABELED, short, long))
        loaders = {"lb": self.stream(labeled, self.batch_size, self.sampler_seed * 2, collate_fn=collate)}
        if self.uratio > 0:
            unlabeled = UnlabeledSet(self.unlabeled, Augment(WEAK, short, long), Augment(STRONG, short, long))
            loaders["ulb"] = self.stream(unlabeled, self.batch_size * self.uratio, self.sampler_seed * 2 + 1,
                                         collate_fn=collate)
        return CombinedLoader(loaders, mode="min_size")

    def val_dataloader(self):
        ds = TestSet(self.test_records, self.test_short_side, self.test_max_long_side)
        return self.eval_loader(ds, self.eval_batch_size, collate_fn=collate)

    test_dataloader = val_dataloader

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Normalise uint8 image batches on the device (official mean/std; padding becomes -mean/std as there)."""
        if isinstance(batch, dict):
            return {k: self.on_after_batch_transfer(v, dataloader_idx) for k, v in batch.items()}
        if isinstance(batch, torch.Tensor) and batch.dtype == torch.uint8 and batch.ndim == 4:
            return (batch.float() - self.mean.to(batch.device)) / self.std.to(batch.device)
        return batch
