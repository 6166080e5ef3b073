"""Image datasets as uint8 arrays, resolved under ``ZOO_DATA_DIR`` (default ``data/``).

Every loader returns an :class:`ImageSet`. Full datasets use their real download path; when a dataset is not on
disk and cannot be downloaded, :class:`MissingDatasetError` names the exact path expected and how to get it.
Nothing here ever substitutes other data. ImageNet is the exception to "arrays": its images stay files, decoded one by
one in the data-loader workers (:class:`ImageFolderImages`, a lazy stand-in for the array).
"""
from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["ImageSet", "IMAGENET_MEAN", "IMAGENET_STD", "MissingDatasetError", "MissingWeightsError", "data_root", "load_image_set", "IMAGE_SETS",
           "CorruptImageError", "ImageFolderImages", "decode_image", "evaluation_images", "load_image_folder"]


# ImageNet statistics on the 0..255 scale (mmcv's img_norm_cfg; what ImageNet-pretrained encoders expect)
IMAGENET_MEAN, IMAGENET_STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)

class MissingDatasetError(FileNotFoundError):
    pass


class MissingWeightsError(FileNotFoundError):
    """Pretrained weights that are neither on disk nor downloadable here (no internet): the message names them."""


@dataclass
class ImageSet:
    name: str
    x_train: np.ndarray  # (N, H, W, C) uint8, or a lazy ImageFolderImages (ImageNet: decoded per item)
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


# ------------------------------------------------------------------------------------ image folders (ImageNet)
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")

IMAGENET_HOW = (
    "ImageNet-1k (ILSVRC-2012) cannot be downloaded automatically: after accepting the licence at "
    "https://image-net.org/download-images.php, download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar, extract "
    "the train tar into ZOO_DATA_DIR/imagenet/train/ (then each per-class tar into train/<wnid>/), the val tar into "
    "ZOO_DATA_DIR/imagenet/val/, and sort val into class folders val/<wnid>/ with the usual valprep.sh "
    "(https://raw.githubusercontent.com/soumith/imagenetloader.torch/master/valprep.sh) -- the layout of "
    "torchvision's ImageFolder and of the official MoCo / mmselfsup setups.")


class CorruptImageError(OSError):
    """An image file that PIL cannot decode (the message names the file)."""


def decode_image(path: str | Path, shorter_side: int | None = None, center_crop: int | None = None) -> np.ndarray:
    """One image file as a uint8 HWC RGB array (greyscale, CMYK and palette images converted).

    ``shorter_side``: resize (bilinear, antialiased, aspect kept) so that the shorter side has this length, as
    torchvision's ``Resize(int)``; JPEG decoding first reduces by a power of two in the DCT while the image stays
    at least twice that size (PIL's ``draft``, as ``Image.thumbnail`` with ``reducing_gap=2``). ``center_crop``: then
    the centred ``center_crop`` x ``center_crop`` square (torchvision's ``CenterCrop``)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            if shorter_side is not None:
                image.draft(None, (2 * shorter_side, 2 * shorter_side))
            image = image.convert("RGB")
            if shorter_side is not None:
                w, h = image.size
                scale = shorter_side / min(w, h)
                size = (shorter_side, max(1, int(h * scale))) if w <= h else (max(1, int(w * scale)), shorter_side)
                image = image.resize(size, Image.BILINEAR)
            if center_crop is not None:
                w, h = image.size
                if min(w, h) < center_crop:
                    raise ValueError(f"{path}: a {w}x{h} image cannot give a {center_crop} px centre crop "
                                     f"(decode it with shorter_side >= center_crop)")
                left, top = int(round((w - center_crop) / 2)), int(round((h - center_crop) / 2))
                image = image.crop((left, top, left + center_crop, top + center_crop))
            return np.asarray(image)
    except (OSError, SyntaxError) as err:  # PIL: UnidentifiedImageError, "image file is truncated", bad headers
        if isinstance(err, FileNotFoundError):
            raise
        raise CorruptImageError(f"cannot decode image file {path}: {type(err).__name__}: {err}") from err


class ImageFolderImages:
    """A lazy sequence of image files: ``len()``, and ``images[i]`` -> uint8 HWC RGB array decoded on access (in the
    data-loader worker that asks for it) with :func:`decode_image`'s ``shorter_side`` / ``center_crop``.

    It stands in for an ImageSet's ``(N, H, W, C)`` array wherever items are read one by one (``ViewDataset``, the
    views): ``images[indices]`` (an index array, a boolean mask or a slice) is the lazy subset. The paths are one numpy
    byte-string array (not a list of Python strings), so forked workers share it instead of copying it page by page
    as reference counts change. ``np.asarray(images)`` decodes everything: allowed only for fixed-size items
    (``center_crop`` set) and at most ``max_array_items`` of them (a batch of an evaluation pass, a test), an error
    naming the cause otherwise -- never all of ImageNet in memory.
    """

    max_array_items = 4096

    def __init__(self, root: str | Path, files: np.ndarray, shorter_side: int | None = None,
                 center_crop: int | None = None):
        files = np.asarray(files)
        self.root = Path(root)
        self.files = np.char.encode(files, "utf-8") if files.dtype.kind == "U" else files.astype(np.bytes_)
        self.shorter_side, self.center_crop = shorter_side, center_crop

    def __len__(self) -> int:
        return len(self.files)

    def path(self, index: int) -> Path:
        return self.root / self.files[index].decode("utf-8")

    def __getitem__(self, index):
        if isinstance(index, (int, np.integer)):
            return decode_image(self.path(index), self.shorter_side, self.center_crop)
        return ImageFolderImages(self.root, self.files[index], self.shorter_side, self.center_crop)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        if self.center_crop is None:
            raise TypeError(f"these {len(self)} images under {self.root} are decoded at their own sizes (lazily, for "
                            "random-resized-crop views) and do not stack into one array: evaluate through "
                            "zoo.core.datasets.evaluation_images(images) (fixed-size centre crops), or read them "
                            "one by one")
        if len(self) > self.max_array_items:
            raise TypeError(f"np.asarray on {len(self)} lazily decoded images under {self.root} would hold them all in "
                            f"memory (at most {self.max_array_items}): iterate in batches (images[i:i + batch])")
        stacked = np.stack([self[i] for i in range(len(self))]) if len(self) else np.zeros(
            (0, self.center_crop, self.center_crop, 3), np.uint8)
        return stacked if dtype is None else stacked.astype(dtype)

    def __repr__(self) -> str:
        return (f"ImageFolderImages({len(self)} files under {self.root}, shorter_side={self.shorter_side}, "
                f"center_crop={self.center_crop})")


def list_image_folder(split_dir: Path, classes: tuple[str, ...] | None = None,
                      how: str = IMAGENET_HOW) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """``split_dir/<class>/<image>`` -> (relative paths as bytes, int64 labels, classes): classes are the sorted
    folder names (torchvision's ImageFolder order) unless given, images sorted within each class; an empty split or
    class folder is a :class:`MissingDatasetError` naming it and ``how`` to obtain the data."""
    found = tuple(sorted(entry.name for entry in os.scandir(split_dir) if entry.is_dir()))
    if not found:
        raise MissingDatasetError(f"no class folders in {split_dir.resolve()}: expected {split_dir}/<class>/<image>\n"
                                  f"  {how}")
    classes = found if classes is None else classes
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise ValueError(f"{split_dir}: class folders {unknown[:5]} are not among the train classes")
    files, labels = [], []
    for label, name in enumerate(classes):
        folder = split_dir / name
        names = sorted(e.name for e in os.scandir(folder) if e.is_file() and e.name.lower().endswith(IMAGE_SUFFIXES)) \
            if folder.is_dir() else []
        if not names:
            raise MissingDatasetError(f"no images ({'/'.join(IMAGE_SUFFIXES)}) in class folder {folder.resolve()}\n"
                                      f"  {how}")
        files += [f"{name}/{file}".encode("utf-8") for file in names]
        labels += [label] * len(names)
    return np.array(files, dtype=np.bytes_), np.array(labels, dtype=np.int64), classes


def load_image_folder(name: str, relative: str, how: str, train_shorter_side: int | None = None,
                      eval_resize: int = 256, eval_crop: int = 224) -> ImageSet:
    """An ImageSet over ``<data root>/<relative>/{train,val}/<class>/<image>`` (val as the test split), decoded
    lazily (see :class:`ImageFolderImages`). Train images are decoded whole, at full resolution
    (``train_shorter_side=None``) or with the shorter side resized to ``train_shorter_side``, for random-resized-crop
    views; val images as the standard evaluation input (shorter side ``eval_resize``, centre ``eval_crop`` crop)."""
    root = require_file(f"{relative}/train", how).parent
    x_train_files, y_train, classes = list_image_folder(root / "train", how=how)
    val = require_file(f"{relative}/val", how)
    x_test_files, y_test, _ = list_image_folder(val, classes, how)
    return ImageSet(name, ImageFolderImages(root / "train", x_train_files, train_shorter_side), y_train,
                    ImageFolderImages(val, x_test_files, eval_resize, eval_crop), y_test,
                    IMAGENET_MEAN_01, IMAGENET_STD_01, classes)


def evaluation_images(images, resize: int = 256, crop: int = 224):
    """``images`` as an evaluation pass (un-augmented ``Identity`` views, feature extraction) reads them: an array
    unchanged; lazily decoded images of varying sizes as fixed-size ones (shorter side ``resize``, centre ``crop``,
    the standard ImageNet evaluation input) so that they stack into batches."""
    if isinstance(images, ImageFolderImages) and images.center_crop is None:
        return ImageFolderImages(images.root, images.files, resize, crop)
    return images


def load_imagenet(download: bool = False, train_shorter_side: int | None = None) -> ImageSet:
    """ImageNet-1k (ILSVRC-2012) from ``ZOO_DATA_DIR/imagenet/{train,val}/<wnid>/*.JPEG``: 1,281,167 train / 50,000
    val (the test split) images, 1,000 classes = the sorted wnids, decoded lazily (:func:`load_image_folder`)."""
    return load_image_folder("imagenet", "imagenet", IMAGENET_HOW, train_shorter_side)


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
    "imagenet": load_imagenet,
    **{f"pacs_unseen_{domain}": _pacs_loader(domain) for domain in PACS_DOMAINS},
}


def load_image_set(name: str, download: bool = True) -> ImageSet:
    if name not in IMAGE_SETS:
        raise ValueError(f"unknown dataset {name!r}; available: {sorted(IMAGE_SETS)}")
    return IMAGE_SETS[name](download=download)
