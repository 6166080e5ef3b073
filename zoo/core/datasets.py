"""Image datasets as uint8 arrays, resolved under ``ZOO_DATA_DIR`` (default ``data/``).

Every loader returns an :class:`ImageSet`. Full datasets use their real download path; when a dataset is not on
disk and cannot be downloaded, :class:`MissingDatasetError` names the exact path expected and how to get it.
Nothing here ever substitutes other data.
"""
from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["ImageSet", "IMAGENET_MEAN", "IMAGENET_STD", "MissingDatasetError", "MissingWeightsError", "data_root", "load_image_set", "IMAGE_SETS"]


# ImageNet statistics on the 0..255 scale (mmcv's img_norm_cfg; what ImageNet-pretrained encoders expect)
IMAGENET_MEAN, IMAGENET_STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)

class MissingDatasetError(FileNotFoundError):
    pass


class MissingWeightsError(FileNotFoundError):
    """Pretrained weights that are neither on disk nor downloadable here (no internet): the message names them."""


@dataclass
class ImageSet:
    name: str
    x_train: np.ndarray  # (N, H, W, C) uint8
    y_train: np.ndarray  # (N,) int64
    x_test: np.ndarray
    y_test: np.ndarray
    mean: tuple[float, ...]  # per channel, in [0, 1], used on device for normalisation
    std: tuple[float, ...]
    classes: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def data_root() -> Path:
    """Where datasets are stored and downloaded: ``ZOO_DATA_DIR``, default ``data/``."""
    return Path(os.environ.get("ZOO_DATA_DIR", "data")).expanduser()


def shared_root() -> Path:
    """The offline data folder shipped beside the checkout (``../shared/data``), searched after ``data_root()``."""
    return Path(os.environ.get("ZOO_SHARED_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))


def require_file(relative: str, how: str) -> Path:
    """The path of a dataset file under ``data_root()`` or ``shared_root()``; a clear error naming the path and ``how``
    to obtain it when neither holds it (never a substitute)."""
    for root in (data_root(), shared_root()):
        if (root / relative).exists():
            return root / relative
    raise MissingDatasetError(f"dataset file not found: {(data_root() / relative).resolve()}\n  {how}\n"
                              f"  (searched ZOO_DATA_DIR={data_root()} and {shared_root()})")


def _rgb(x: np.ndarray) -> np.ndarray:
    return np.repeat(x[..., None], 3, axis=-1) if x.ndim == 3 else x


CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)


def _torchvision_cifar(name: str, download: bool) -> ImageSet:
    from torchvision import datasets

    cls = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}[name]
    root = data_root() / name
    try:
        train = cls(str(root), train=True, download=download)
        test = cls(str(root), train=False, download=download)
    except Exception as err:  # offline: URLError / RuntimeError("Dataset not found")
        raise MissingDatasetError(
            f"{name} is not in {root.resolve()} and could not be downloaded ({type(err).__name__}: {err}).\n"
            f"  With internet, rerun and it downloads there; or place torchvision's extracted "
            f"'{cls.base_folder}/' folder (from {cls.url}) in {root.resolve()}.") from err
    mean, std = (CIFAR10_MEAN, CIFAR10_STD) if name == "cifar10" else (CIFAR100_MEAN, CIFAR100_STD)
    return ImageSet(name, train.data, np.asarray(train.targets, np.int64), test.data,
                    np.asarray(test.targets, np.int64), mean, std, tuple(train.classes))


def load_cifar10(download: bool = True) -> ImageSet:
    return _torchvision_cifar("cifar10", download)


def load_cifar100(download: bool = True) -> ImageSet:
    return _torchvision_cifar("cifar100", download)


def load_cifar10_subset(download: bool = False) -> ImageSet:
    """The offline 10k/2k CIFAR-10 subset (JPEG-decoded; see its SOURCE.md)."""
    path = require_file("cifar10/cifar10_subset.npz",
                    "It ships in the zoo's shared offline data (set ZOO_DATA_DIR=../shared/data).")
    d = np.load(path)
    return ImageSet("cifar10_subset", d["x_train"], d["y_train"].astype(np.int64), d["x_test"],
                    d["y_test"].astype(np.int64), CIFAR10_MEAN, CIFAR10_STD, CIFAR10_CLASSES)


def _idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path) as f:
        return np.frombuffer(f.read(), np.uint8, offset=offset)


def load_mnist(download: bool = False) -> ImageSet:
    """MNIST 60k/10k from torchvision's raw idx files (``<root>/mnist/MNIST/raw/*.gz``), as 28x28 RGB."""
    raw = "mnist/MNIST/raw/"
    how = "Download the four idx .gz files from http://yann.lecun.com/exdb/mnist/ into that folder."
    x_tr = _idx(require_file(raw + "train-images-idx3-ubyte.gz", how), 16).reshape(-1, 28, 28)
    y_tr = _idx(require_file(raw + "train-labels-idx1-ubyte.gz", how), 8)
    x_te = _idx(require_file(raw + "t10k-images-idx3-ubyte.gz", how), 16).reshape(-1, 28, 28)
    y_te = _idx(require_file(raw + "t10k-labels-idx1-ubyte.gz", how), 8)
    return ImageSet("mnist", _rgb(x_tr), y_tr.astype(np.int64), _rgb(x_te), y_te.astype(np.int64),
                    (0.1307,) * 3, (0.3081,) * 3, tuple(str(i) for i in range(10)))


def load_usps(download: bool = False) -> ImageSet:
    """USPS 7,291/2,007 at 16x16, as RGB."""
    path = require_file("usps/usps_16x16.npz",
                    "It ships in the zoo's shared offline data (set ZOO_DATA_DIR=../shared/data).")
    d = np.load(path)
    return ImageSet("usps", _rgb(d["x_train"]), d["y_train"].astype(np.int64), _rgb(d["x_test"]),
                    d["y_test"].astype(np.int64), (0.2469,) * 3, (0.2989,) * 3, tuple(str(i) for i in range(10)))


def load_digits(download: bool = False) -> ImageSet:
    """scikit-learn's 1,797 8x8 digits, upscaled (bilinear) to 32x32 RGB; fixed stratified 70/30 split (seed 0)."""
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    digits = sk_digits()
    images = torch.from_numpy(digits.images).float()[:, None] * (255.0 / 16.0)
    images = F.interpolate(images, size=(32, 32), mode="bilinear", align_corners=False)
    images = images.round().clamp(0, 255).to(torch.uint8)[:, 0].numpy()
    x_tr, x_te, y_tr, y_te = train_test_split(images, digits.target, test_size=0.3, stratify=digits.target,
                                              random_state=0)
    mean, std = float(x_tr.mean() / 255), float(x_tr.std() / 255)
    return ImageSet("digits", _rgb(x_tr), y_tr.astype(np.int64), _rgb(x_te), y_te.astype(np.int64),
                    (mean,) * 3, (std,) * 3, tuple(str(i) for i in range(10)))


# the ImageNet statistics above on ImageSet's 0..1 scale, for the ImageNet-derived sets below
IMAGENET_MEAN_01, IMAGENET_STD_01 = tuple(v / 255 for v in IMAGENET_MEAN), tuple(v / 255 for v in IMAGENET_STD)


def load_imagenette_subset(download: bool = False) -> ImageSet:
    """The offline Imagenette subset: 10 ImageNet classes, 800 train / 400 val (used as the test split) at 64x64
    (see its SOURCE.md). Not the full Imagenette (9,469 / 3,925 images), which the zoo does not load."""
    path = require_file("imagenette/imagenette_64px_subset.npz",
                    "It ships in the zoo's shared offline data (set ZOO_DATA_DIR=../shared/data).")
    d = np.load(path)
    return ImageSet("imagenette_subset", d["x_train"], d["y_train"].astype(np.int64), d["x_val"],
                    d["y_val"].astype(np.int64), IMAGENET_MEAN_01, IMAGENET_STD_01,
                    tuple(str(c) for c in d["class_names"]))


PACS_DOMAINS = ("art_painting", "cartoon", "photo", "sketch")


def load_pacs_unseen(domain: str) -> ImageSet:
    """PACS (offline subset: 4 domains x 7 classes x 64 images at 64x64) split leave-one-domain-out: the train
    split holds the three other domains, the test split the unseen ``domain``."""
    if domain not in PACS_DOMAINS:
        raise ValueError(f"unknown PACS domain {domain!r}; domains: {PACS_DOMAINS}")
    path = require_file("pacs/pacs_64px_64per.npz",
                    "It ships in the zoo's shared offline data (set ZOO_DATA_DIR=../shared/data).")
    d = np.load(path)
    names = tuple(str(n) for n in d["domain_names"])
    if names != PACS_DOMAINS:
        raise ValueError(f"{path}: domain_names {names} are not the expected {PACS_DOMAINS}")
    unseen = d["domain"] == PACS_DOMAINS.index(domain)
    y = d["y"].astype(np.int64)
    return ImageSet(f"pacs_unseen_{domain}", d["x"][~unseen], y[~unseen], d["x"][unseen], y[unseen],
                    IMAGENET_MEAN_01, IMAGENET_STD_01, tuple(str(c) for c in d["class_names"]))


def _pacs_loader(domain: str):
    def load(download: bool = False) -> ImageSet:
        return load_pacs_unseen(domain)

    load.__doc__ = f"PACS with {domain} unseen (test) and the three other domains as the train split."
    return load


IMAGE_SETS = {
    "cifar10": load_cifar10,
    "cifar100": load_cifar100,
    "cifar10_subset": load_cifar10_subset,
    "mnist": load_mnist,
    "usps": load_usps,
    "digits": load_digits,
    "imagenette_subset": load_imagenette_subset,
    **{f"pacs_unseen_{domain}": _pacs_loader(domain) for domain in PACS_DOMAINS},
}


def load_image_set(name: str, download: bool = True) -> ImageSet:
    if name not in IMAGE_SETS:
        raise ValueError(f"unknown dataset {name!r}; available: {sorted(IMAGE_SETS)}")
    return IMAGE_SETS[name](download=download)
