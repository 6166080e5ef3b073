"""Long-tailed training sets and MDCS's two views.

The long-tailed set is the one of LDAM-DRW, which MDCS uses unchanged (official ``data_loader/imbalance_cifar.py``,
``IMBALANCECIFAR10``): class ``c`` of ``C`` keeps ``int(n_max * (1 / IR) ** (c / (C - 1)))`` images, ``n_max`` the
balanced per-class count, chosen by ``np.random.seed(0)`` and one ``np.random.shuffle`` of each class's indices in
class order; so on full CIFAR the subset is the official one, image for image. The test set stays balanced.

Views (official ``cifar_data_loaders.py``): the weak view (the teacher of consistency self-distillation) is a
random crop with 4 px zero padding, a horizontal flip and a random rotation within +-15 degrees; the strong view
(the student) is the crop and flip, AutoAugment's CIFAR-10 policy, and Cutout of one 16 px square.
"""
from __future__ import annotations

import random

import numpy as np
import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF

from zoo.core.views import View
from zoo.semisup.data import SemiSupervisedDataModule

__all__ = ["LongTailedDataModule", "MDCSStrongView", "MDCSWeakView", "long_tailed_counts", "long_tailed_indices"]


def long_tailed_counts(per_class_max: float, num_classes: int, imbalance_ratio: float) -> list[int]:
    """The exponential profile: ``int(n_max * (1 / IR) ** (c / (C - 1)))`` images of class ``c`` (official
    ``get_img_num_per_cls`` with ``imb_type='exp'``, ``imb_factor = 1 / IR``)."""
    return [int(per_class_max * (1 / imbalance_ratio) ** (c / (num_classes - 1.0))) for c in range(num_classes)]


def long_tailed_indices(labels: np.ndarray, counts: list[int], seed: int = 0) -> np.ndarray:
    """The first ``counts[c]`` of class c's indices after one shuffle per class, in class order, with a legacy
    ``RandomState(seed)`` (the official ``gen_imbalanced_data`` after ``np.random.seed(rand_number=0)``)."""
    rng = np.random.RandomState(seed)
    chosen = []
    for c, count in enumerate(counts):
        indices = np.flatnonzero(labels == c)
        rng.shuffle(indices)
        chosen.append(indices[:count])
    return np.concatenate(chosen)


class LongTailedDataModule(SemiSupervisedDataModule):
    """The fully supervised stream over a long-tailed subset of ``dataset``'s training set (``batch["lb"]``), and
    the balanced test set. ``class_counts`` (training images per class) is what the module's logit adjustment
    and the many/medium/few-shot split read.

    Args:
        imbalance_ratio: IR = n_max / n_min (paper: 100 and 50; official ``imb_factor`` = 1 / IR).
        imbalance_seed: the seed of the per-class shuffles (official ``rand_number=0``).
        steps_per_epoch: default 194 = ceil(12,406 / 64), one pass over CIFAR-10-LT (IR 100) at batch 64.
        Other arguments: :class:`SemiSupervisedDataModule` (``num_labels`` and ``uratio`` are fixed: every image of
        the long-tailed set is labeled, no unlabeled stream). Default views: MDCS's weak and strong.
    """

    def __init__(self, dataset: str = "cifar10", imbalance_ratio: float = 100.0, imbalance_seed: int = 0,
                 batch_size: int = 64, steps_per_epoch: int = 194, labeled_views: dict[str, View] | None = None,
                 eval_batch_size: int = 256, num_workers: int = 4, sampler_seed: int = 0, download: bool = True,
                 pin_memory: bool = True):
        views = labeled_views if labeled_views is not None else {"weak": MDCSWeakView(), "strong": MDCSStrongView()}
        super().__init__(dataset=dataset, num_labels=None, batch_size=batch_size, uratio=0,
                         steps_per_epoch=steps_per_epoch, labeled_views=views, eval_batch_size=eval_batch_size,
                         num_workers=num_workers, sampler_seed=sampler_seed, download=download, pin_memory=pin_memory)
        self.imbalance_ratio, self.imbalance_seed = imbalance_ratio, imbalance_seed

    def setup(self, stage: str | None = None) -> None:
        if self.data is not None:
            return
        super().setup(stage)
        labels, num_classes = self.data.y_train, self.data.num_classes
        self.class_counts = long_tailed_counts(len(labels) / num_classes, num_classes, self.imbalance_ratio)
        self.labeled_idx = long_tailed_indices(labels, self.class_counts, self.imbalance_seed)


class MDCSWeakView(View):
    """Random crop (zero padding ``pad``), horizontal flip, rotation by U(-degrees, degrees) with nearest
    sampling and black corners (torchvision's ``RandomCrop(32, 4)``, ``RandomHorizontalFlip``,
    ``RandomRotation(15)``, as the official weak view)."""

    def __init__(self, pad: int = 4, flip: bool = True, degrees: float = 15.0):
        self.pad, self.flip, self.degrees = pad, flip, degrees

    def crop_and_flip(self, image: np.ndarray, rng: random.Random) -> np.ndarray:
        h, w = image.shape[:2]
        padded = np.pad(image, ((self.pad, self.pad), (self.pad, self.pad), (0, 0)))
        top, left = rng.randint(0, 2 * self.pad), rng.randint(0, 2 * self.pad)
        image = padded[top : top + h, left : left + w]
        return image[:, ::-1] if self.flip and rng.random() < 0.5 else image

    def __call__(self, image, rng):
        chw = torch.from_numpy(np.ascontiguousarray(self.crop_and_flip(image, rng))).permute(2, 0, 1)
        rotated = TF.rotate(chw, rng.uniform(-self.degrees, self.degrees))
        return rotated.permute(1, 2, 0).numpy()


class MDCSStrongView(MDCSWeakView):
    """Crop and flip, AutoAugment's CIFAR-10 policy (torchvision; the same 25 sub-policies as the official
    ``autoaug.py`` ``CIFAR10Policy``), then Cutout: one ``cutout`` px square, centred uniformly on the image and
    clipped at its border, set to black (official ``Cutout(n_holes=1, length=16)`` before normalisation)."""

    def __init__(self, pad: int = 4, flip: bool = True, cutout: int = 16):
        super().__init__(pad=pad, flip=flip, degrees=0.0)
        self.cutout = cutout
        self.autoaugment = T.AutoAugment(T.AutoAugmentPolicy.CIFAR10)

    def __call__(self, image, rng):
        chw = torch.from_numpy(np.ascontiguousarray(self.crop_and_flip(image, rng))).permute(2, 0, 1)
        with torch.random.fork_rng(devices=[]):  # AutoAugment draws from torch's global generator: seed it from rng
            torch.manual_seed(rng.getrandbits(63))
            image = self.autoaugment(chw).permute(1, 2, 0).numpy().copy()
        h, w = image.shape[:2]
        y, x, half = rng.randrange(h), rng.randrange(w), self.cutout // 2
        image[max(y - half, 0) : y + half, max(x - half, 0) : x + half] = 0
        return image
