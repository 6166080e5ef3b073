"""UDA's strong view: its own RandAugment variant followed by Cutout, then flip and pad-and-crop.

As in the official code (google-research/uda, ``image/randaugment/policies.py::randaug_policies``,
``augmentation_transforms.py``, ``preprocess.py::proc_and_dump_unsup_data`` and ``data.py``):

- two ops drawn uniformly, with replacement, from 15 (the list below, with Invert and Cutout, without Identity);
  each gets its own integer level drawn uniformly from 1..9 (out of 10) and is applied with probability 0.5;
- levels map to values exactly as the official ``*_impl`` functions do (rotate up to 27 degrees, shear up to 0.27,
  translate up to 9 px, posterize down to 1 bit, enhance factors 0.28..1.72, an op-Cutout of 2*level px; the
  geometric ops pick a random sign);
- then a Cutout of half the image side (16 px on CIFAR), whose box is centred on a uniformly drawn pixel and
  clipped at the border (``create_cutout_mask``; the zoo's core ``cutout`` shifts the box instead, so it is not
  reused here);
- then random horizontal flip and reflect-pad-by-4 random crop, applied at training time to every view.

The official code works on normalised images and fills cut-out squares and the pixels that rotate/shear/translate
bring in with 0, i.e. with the dataset mean colour; ``fill`` is that colour (CIFAR-10's by default). Pixel sizes
(translate, Cutout) are given for 32-pixel images and scale with the image width. The official pipeline
pre-computes 100 augmented copies per image offline; here the view is drawn afresh for every sample.
"""
from __future__ import annotations

import random

import numpy as np
from PIL import Image, ImageOps

from zoo.core.views import CUTOUT_FILL, View, apply_op, flip_and_crop

__all__ = ["UDA_OPS", "UDAStrongView", "op_value", "centred_cutout"]

UDA_OPS = ("Invert", "Cutout", "Sharpness", "AutoContrast", "Posterize", "ShearX", "TranslateX", "TranslateY",
           "ShearY", "Rotate", "Equalize", "Contrast", "Color", "Solarize", "Brightness")
MAX_LEVEL = 10  # the official PARAMETER_MAX; drawn levels are 1..9
REFERENCE_WIDTH = 32  # image width the official pixel magnitudes refer to
SIGNED_OPS = ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY")


def op_value(name: str, level: int) -> float:
    """The official mapping from an integer level to the op's argument (unsigned, pixels at 32 px)."""
    if name == "Rotate":
        return int(level * 30 / MAX_LEVEL)  # degrees
    if name in ("ShearX", "ShearY"):
        return level * 0.3 / MAX_LEVEL
    if name in ("TranslateX", "TranslateY"):
        return int(level * 10 / MAX_LEVEL)  # pixels
    if name == "Posterize":
        return 4 - int(level * 4 / MAX_LEVEL)  # bits kept
    if name == "Solarize":
        return 256 - int(level * 256 / MAX_LEVEL)  # threshold
    if name in ("Sharpness", "Contrast", "Color", "Brightness"):
        return level * 1.8 / MAX_LEVEL + 0.1  # enhance factor; 0 would destroy the image
    if name == "Cutout":
        return int(level * 20 / MAX_LEVEL)  # side in pixels
    return 0.0  # Invert, AutoContrast, Equalize take no magnitude


def centred_cutout(image: np.ndarray, side: int, rng: random.Random, fill) -> np.ndarray:
    """Fill ``[c - side//2, c + side//2)`` around a uniformly drawn pixel ``c``, clipped at the border."""
    h, w = image.shape[:2]
    cy, cx = rng.randrange(h), rng.randrange(w)
    out = image.copy()
    colour = fill if image.ndim == 3 else int(np.mean(fill))
    out[max(0, cy - side // 2):min(h, cy + side // 2), max(0, cx - side // 2):min(w, cx + side // 2)] = colour
    return out


def _geometric(image: np.ndarray, name: str, value: float, fill) -> np.ndarray:
    img = Image.fromarray(image)
    colour = tuple(fill) if img.mode == "RGB" else int(np.mean(fill))
    if name == "Rotate":
        return np.asarray(img.rotate(value, fillcolor=colour))
    # PIL's AFFINE maps output (x, y) to input (a x + b y + c, d x + e y + f), as the official code uses it
    coeffs = {"ShearX": (1, value, 0, 0, 1, 0), "ShearY": (1, 0, 0, value, 1, 0),
              "TranslateX": (1, 0, value, 0, 1, 0), "TranslateY": (1, 0, 0, 0, 1, value)}[name]
    return np.asarray(img.transform(img.size, Image.AFFINE, coeffs, fillcolor=colour))


class UDAStrongView(View):
    """UDA's RandAugment (``num_ops`` ops, each with probability ``op_probability`` and a random level), Cutout
    of ``cutout_fraction`` of the side, then flip (optional; off for SVHN in the paper) and pad-and-crop."""

    def __init__(self, num_ops: int = 2, op_probability: float = 0.5, cutout_fraction: float = 0.5,
                 pad_fraction: float = 0.125, flip: bool = True, fill: tuple[int, ...] = CUTOUT_FILL,
                 ops: tuple[str, ...] = UDA_OPS):
        unknown = set(ops) - set(UDA_OPS)
        if unknown:
            raise ValueError(f"unknown UDA RandAugment ops {sorted(unknown)}; known: {sorted(UDA_OPS)}")
        self.num_ops, self.op_probability, self.cutout_fraction = num_ops, op_probability, cutout_fraction
        self.pad_fraction, self.flip, self.fill, self.ops = pad_fraction, flip, tuple(fill), tuple(ops)

    def apply(self, image: np.ndarray, name: str, level: int, rng: random.Random) -> np.ndarray:
        """One op at an integer level (1..9), with the official random sign for geometric ops."""
        value = op_value(name, level)
        scale = image.shape[1] / REFERENCE_WIDTH
        if name in SIGNED_OPS and rng.random() > 0.5:
            value = -value
        if name in ("TranslateX", "TranslateY"):
            return _geometric(image, name, round(value * scale), self.fill)
        if name in SIGNED_OPS:
            return _geometric(image, name, value, self.fill)
        if name == "Cutout":
            return centred_cutout(image, round(value * scale), rng, self.fill) if value > 0 else image
        if name == "Invert":
            return np.asarray(ImageOps.invert(Image.fromarray(image)))
        return apply_op(image, name, value)

    def __call__(self, image, rng):
        for _ in range(self.num_ops):
            name, level = rng.choice(self.ops), rng.randint(1, MAX_LEVEL - 1)
            if rng.random() < self.op_probability:
                image = self.apply(image, name, level, rng)
        side = round(self.cutout_fraction * image.shape[1])
        image = centred_cutout(image, side, rng, self.fill)
        return flip_and_crop(image, rng, self.pad_fraction, self.flip)
