"""Augmentation views for image methods.

A view is a callable ``view(image, rng) -> image`` on one ``uint8`` HWC numpy image. All randomness comes from
``rng`` (a ``random.Random`` seeded per sample by the sampler), so a sample's augmentation depends only on
(seed, epoch, position): the same with any number of workers, any number of GPUs, and after a resume.
Normalisation is not a view: images stay ``uint8`` until they reach the device (see ``data.py``).

``WeakView`` and ``StrongView`` are FixMatch's pair (Sohn et al. 2020, Sec. 2.3 and Table 12): flip + pad-and-crop,
and the same followed by RandAugment with a random magnitude per op and Cutout.
"""
from __future__ import annotations

import random
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

__all__ = ["View", "Identity", "WeakView", "StrongView", "RANDAUGMENT_OPS", "apply_op", "cutout"]


class View:
    """Base class: subclasses implement ``__call__(image: np.ndarray, rng: random.Random) -> np.ndarray``."""

    def __call__(self, image: np.ndarray, rng: random.Random) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError


class Identity(View):
    """The image as stored (evaluation)."""

    def __call__(self, image, rng):
        return image


def flip_and_crop(image: np.ndarray, rng: random.Random, pad_fraction: float, flip: bool) -> np.ndarray:
    """Random horizontal flip, reflect-pad by ``pad_fraction`` of the side, random crop back to size."""
    if flip and rng.random() < 0.5:
        image = image[:, ::-1]
    h, w = image.shape[:2]
    pad = int(round(h * pad_fraction))
    if pad == 0:
        return np.ascontiguousarray(image)
    padded = np.pad(image, ((pad, pad), (pad, pad)) + ((0, 0),) * (image.ndim - 2), mode="reflect")
    top, left = rng.randint(0, 2 * pad), rng.randint(0, 2 * pad)
    return np.ascontiguousarray(padded[top : top + h, left : left + w])


class WeakView(View):
    """Flip (p=0.5) and translate by up to 12.5% through reflect padding and cropping."""

    def __init__(self, pad_fraction: float = 0.125, flip: bool = True):
        self.pad_fraction = pad_fraction
        self.flip = flip

    def __call__(self, image, rng):
        return flip_and_crop(image, rng, self.pad_fraction, self.flip)


# RandAugment as FixMatch uses it (paper Table 12; also USB's ``augment_list``): each op draws its magnitude
# uniformly from its range for every sample, instead of RandAugment's single global magnitude.
RANDAUGMENT_OPS: dict[str, tuple[float, float]] = {
    "AutoContrast": (0.0, 1.0),
    "Brightness": (0.05, 0.95),
    "Color": (0.05, 0.95),
    "Contrast": (0.05, 0.95),
    "Equalize": (0.0, 1.0),
    "Identity": (0.0, 1.0),
    "Posterize": (4.0, 8.0),
    "Rotate": (-30.0, 30.0),
    "Sharpness": (0.05, 0.95),
    "ShearX": (-0.3, 0.3),
    "ShearY": (-0.3, 0.3),
    "Solarize": (0.0, 256.0),
    "TranslateX": (-0.3, 0.3),
    "TranslateY": (-0.3, 0.3),
}

CUTOUT_FILL = (125, 123, 114)  # the CIFAR-10 mean colour, as in the official code


def _affine(img: Image.Image, coeffs: tuple) -> Image.Image:
    # PIL's AFFINE maps output (x, y) to input (a x + b y + c, d x + e y + f), about the top-left corner.
    return img.transform(img.size, Image.AFFINE, coeffs)


_PIL_OPS: dict[str, Callable[[Image.Image, float], Image.Image]] = {
    "AutoContrast": lambda img, v: ImageOps.autocontrast(img),
    "Brightness": lambda img, v: ImageEnhance.Brightness(img).enhance(v),
    "Color": lambda img, v: ImageEnhance.Color(img).enhance(v),
    "Contrast": lambda img, v: ImageEnhance.Contrast(img).enhance(v),
    "Equalize": lambda img, v: ImageOps.equalize(img),
    "Identity": lambda img, v: img,
    "Posterize": lambda img, v: ImageOps.posterize(img, max(1, int(v))),
    "Rotate": lambda img, v: img.rotate(v),
    "Sharpness": lambda img, v: ImageEnhance.Sharpness(img).enhance(v),
    "ShearX": lambda img, v: _affine(img, (1, v, 0, 0, 1, 0)),
    "ShearY": lambda img, v: _affine(img, (1, 0, 0, v, 1, 0)),
    "Solarize": lambda img, v: ImageOps.solarize(img, v),
    "TranslateX": lambda img, v: _affine(img, (1, 0, v * img.size[0], 0, 1, 0)),
    "TranslateY": lambda img, v: _affine(img, (1, 0, 0, 0, 1, v * img.size[1])),
}


def apply_op(image: np.ndarray, name: str, magnitude: float) -> np.ndarray:
    """One RandAugment op at a given magnitude on a uint8 HWC (or HW) image."""
    return np.asarray(_PIL_OPS[name](Image.fromarray(image), magnitude))


def cutout(image: np.ndarray, size_fraction: float, rng: random.Random, fill=CUTOUT_FILL) -> np.ndarray:
    """Fill a square of side ``size_fraction * width`` centred uniformly at random, clipped at the border."""
    if size_fraction <= 0:
        return image
    h, w = image.shape[:2]
    side = size_fraction * w
    x0 = int(max(0, rng.uniform(0, w) - side / 2))
    y0 = int(max(0, rng.uniform(0, h) - side / 2))
    x1, y1 = min(w, x0 + side), min(h, y0 + side)
    img = Image.fromarray(image)
    colour = fill if img.mode == "RGB" else int(np.mean(fill))
    ImageDraw.Draw(img).rectangle((x0, y0, x1, y1), colour)  # inclusive corners, as PIL draws them
    return np.asarray(img)


class StrongView(View):
    """Weak view, then ``num_ops`` RandAugment ops with random magnitudes, then Cutout.

    ``num_ops=2`` follows the FixMatch paper; USB's CIFAR configs use 3. Cutout's side is drawn from
    ``U[0, cutout_max]`` of the image width (paper Table 12, USB).
    """

    def __init__(self, num_ops: int = 2, cutout_max: float = 0.5, pad_fraction: float = 0.125, flip: bool = True,
                 ops: tuple[str, ...] = tuple(RANDAUGMENT_OPS)):
        unknown = set(ops) - set(RANDAUGMENT_OPS)
        if unknown:
            raise ValueError(f"unknown RandAugment ops {sorted(unknown)}; known: {sorted(RANDAUGMENT_OPS)}")
        self.num_ops, self.cutout_max = num_ops, cutout_max
        self.pad_fraction, self.flip, self.ops = pad_fraction, flip, tuple(ops)

    def __call__(self, image, rng):
        image = flip_and_crop(image, rng, self.pad_fraction, self.flip)
        for name in rng.choices(self.ops, k=self.num_ops):
            low, high = RANDAUGMENT_OPS[name]
            image = apply_op(image, name, low + (high - low) * rng.random())
        return cutout(image, rng.random() * self.cutout_max, rng)
