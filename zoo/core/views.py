"""Augmentation views for image methods.

A view is a callable ``view(image, rng) -> image`` on one ``uint8`` HWC numpy image. All randomness comes from
``rng`` (a ``random.Random`` seeded per sample by the sampler), so a sample's augmentation depends only on
(seed, epoch, position): the same with any number of workers, any number of GPUs, and after a resume.
Normalisation is not a view: images stay ``uint8`` until they reach the device (see ``data.py``).

``WeakView`` and ``StrongView`` are FixMatch's pair (Sohn et al. 2020, Sec. 2.3 and Table 12): flip + pad-and-crop,
and the same followed by RandAugment with a random magnitude per op and Cutout.

Speed: the input pipeline of the FixMatch family augments every unlabeled image twice per step on the CPU, so
every op here is plain numpy on the uint8 array instead of a PIL round trip. Each op reproduces the PIL function
that the official code (USB's ``randaugment.py``) calls, bit for bit, by following Pillow's C arithmetic: the
Rec. 601 grey level ``(19595 R + 38470 G + 7471 B + 2^15) >> 16``, ``Image.blend``'s single-precision
``in1 + alpha * (in2 - in1)`` truncated to uint8, the SMOOTH kernel rounded to nearest, ``autocontrast`` and
``equalize`` look-up tables, and nearest-neighbour affine sampling (16.16 fixed point for shear and rotation,
accumulated doubles for translation, pixel centres at +0.5, black outside). ``tests/test_views.py`` checks each
op, Cutout and whole views against PIL on real CIFAR-10 images; ``docs/performance.md`` has the throughput.
"""
from __future__ import annotations

import math
import random
from functools import lru_cache
from typing import Callable

import numpy as np

__all__ = ["View", "Identity", "WeakView", "StrongView", "RANDAUGMENT_OPS", "apply_op", "cutout", "random_resized_box"]



def random_resized_box(height: int, width: int, rng: random.Random, scale: tuple[float, float] = (0.08, 1.0),
                       ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """``(top, left, crop_height, crop_width)`` of a RandomResizedCrop box: ``U(scale)`` of the area, log-uniform
    aspect ratio (width / height) in ``ratio``; torchvision's sampler (10 tries, then the largest centred crop within
    ``ratio``). Shared by the views that crop and by stores that record crops (FKD's soft labels)."""
    area = height * width
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        crop_w, crop_h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            return rng.randint(0, height - crop_h), rng.randint(0, width - crop_w), crop_h, crop_w
    aspect = width / height
    crop_w, crop_h = ((width, int(round(width / ratio[0]))) if aspect < ratio[0] else
                      (int(round(height * ratio[1])), height) if aspect > ratio[1] else (width, height))
    crop_w, crop_h = min(crop_w, width), min(crop_h, height)
    return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w

class View:
    """Base class: subclasses implement ``__call__(image: np.ndarray, rng: random.Random) -> np.ndarray``."""

    def __call__(self, image: np.ndarray, rng: random.Random) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError


class Identity(View):
    """The image as stored (evaluation)."""

    def __call__(self, image, rng):
        return image


@lru_cache(maxsize=32)
def _reflected_windows(size: int, pad: int) -> np.ndarray:
    """Row ``offset`` holds the source indices of a ``size``-long window at ``offset`` in the reflect-padded axis."""
    padded = np.pad(np.arange(size), pad, mode="reflect")
    return np.stack([padded[offset : offset + size] for offset in range(2 * pad + 1)])


def flip_and_crop(image: np.ndarray, rng: random.Random, pad_fraction: float, flip: bool) -> np.ndarray:
    """Random horizontal flip, reflect-pad by ``pad_fraction`` of the side, random crop back to size."""
    flipped = flip and rng.random() < 0.5
    h, w = image.shape[:2]
    pad = int(round(h * pad_fraction))
    if pad == 0:
        return np.ascontiguousarray(image[:, ::-1] if flipped else image)
    top, left = rng.randint(0, 2 * pad), rng.randint(0, 2 * pad)
    # the crop indexes the original image through the reflection instead of building the padded copy
    rows, cols = _reflected_windows(h, pad)[top], _reflected_windows(w, pad)[left]
    if flipped:
        cols = (w - 1) - cols
    return image.take(rows, axis=0).take(cols, axis=1)


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


# ----------------------------------------------------------------------------- colour ops (Pillow's arithmetic)
_BYTES = np.arange(256, dtype=np.uint8)
_LUMA_WEIGHTS = np.array([19595, 38470, 7471], np.int32)


def _clamp(values: np.ndarray, low, high) -> np.ndarray:
    """``np.clip`` in place, without its Python-level overhead (which costs more than the work on these sizes)."""
    np.maximum(values, low, out=values)
    return np.minimum(values, high, out=values)


def _grey(image: np.ndarray) -> np.ndarray:
    """PIL's ``convert("L")``: ITU-R 601 luma in 16-bit fixed point, as an int32 HW array."""
    if image.ndim == 2:
        return image.astype(np.int32)
    return (image @ _LUMA_WEIGHTS + 0x8000) >> 16


def _blend(degenerate, image: np.ndarray, factor: float) -> np.ndarray:
    """PIL's ``Image.blend(degenerate, image, factor)``: float32 interpolation, truncated (clipped if extrapolating)."""
    base = np.asarray(degenerate, np.float32)
    out = base + np.float32(factor) * (image.astype(np.float32) - base)
    return _clamp(out, 0, 255).astype(np.uint8)


def _blend_with_constant(value: int, image: np.ndarray, factor: float) -> np.ndarray:
    """``_blend`` against a one-colour image, through a 256-entry table (the same arithmetic per byte value)."""
    return _blend(value, _BYTES, factor).take(image)


def _smooth(image: np.ndarray) -> np.ndarray:
    """PIL's ``ImageFilter.SMOOTH`` (3x3 ones with centre 5, /13, rounded), which leaves the border pixels as they are.

    PIL sums float32 products; the exact integer rounding below gives the same bytes because a sum over 13 can never
    lie within float32 error of a half.
    """
    x = image.astype(np.int16)
    columns = x[:-2] + x[1:-1] + x[2:]
    total = columns[:, :-2] + columns[:, 1:-1] + columns[:, 2:] + 4 * x[1:-1, 1:-1]
    out = image.copy()
    out[1:-1, 1:-1] = (2 * total + 13) // 26
    return out


@lru_cache(maxsize=32)
def _channel_of_each_byte(shape: tuple[int, ...]) -> np.ndarray:
    """0, 1, 2, 0, 1, 2, ... over an HWC image (all 0 for HW): indexes interleaved per-channel tables."""
    channels = shape[2] if len(shape) == 3 else 1
    return np.ascontiguousarray(np.broadcast_to(np.arange(channels), shape if len(shape) == 3 else shape + (1,)))


def _table_index(image: np.ndarray) -> tuple[np.ndarray, int]:
    """``value * channels + channel`` for every byte, and the number of channels."""
    channels = image.shape[2] if image.ndim == 3 else 1
    return (image.astype(np.intp) * channels + _channel_of_each_byte(image.shape).reshape(image.shape)), channels


def _apply_channel_luts(image: np.ndarray, luts: np.ndarray) -> np.ndarray:
    """Channel ``c`` through ``luts[c]`` (values already clipped to 0..255, as PIL's ``point`` clips them)."""
    index, _ = _table_index(image)
    return luts.astype(np.uint8).T.ravel().take(index)


def _autocontrast(image: np.ndarray, _) -> np.ndarray:
    """PIL's ``ImageOps.autocontrast``: per channel, ``int(i * 255 / (hi - lo) - lo * 255 / (hi - lo))`` clipped."""
    planes = np.ascontiguousarray(image.reshape(-1, image.shape[2]).T) if image.ndim == 3 else image.reshape(1, -1)
    low, high = planes.min(axis=1).astype(np.float64), planes.max(axis=1).astype(np.float64)
    stretch = high > low
    scale = np.where(stretch, 255.0 / np.where(stretch, high - low, 1.0), 1.0)
    offset = np.where(stretch, -low * scale, 0.0)
    luts = np.trunc(np.arange(256.0) * scale[:, None] + offset[:, None])
    return _apply_channel_luts(image, _clamp(luts, 0, 255))


def _equalize(image: np.ndarray, _) -> np.ndarray:
    """PIL's ``ImageOps.equalize``: per channel ``lut[i] = (step // 2 + #pixels below i) // step``, clipped, where
    ``step = (#pixels - #pixels at the highest used value) // 255``; identity when ``step`` is 0."""
    index, channels = _table_index(image)
    hist = np.bincount(index.ravel(), minlength=256 * channels).reshape(256, channels).T
    highest = 255 - np.argmax(hist[:, ::-1] > 0, axis=1)
    step = (index.size // channels - hist[np.arange(channels), highest]) // 255
    below = np.cumsum(hist, axis=1) - hist
    equalized = (step[:, None] // 2 + below) // np.maximum(step, 1)[:, None]
    luts = np.where(step[:, None] > 0, equalized, np.arange(256))  # one used value gives step 0 too
    return _apply_channel_luts(image, _clamp(luts, 0, 255))


def _posterize(image: np.ndarray, magnitude: float) -> np.ndarray:
    bits = max(1, int(magnitude))
    if bits > 8:
        raise ValueError(f"Posterize keeps 1..8 bits, got {bits}")
    return image & np.uint8(0xFF & ~(2 ** (8 - bits) - 1))


def _solarize(image: np.ndarray, threshold: float) -> np.ndarray:
    return np.where(_BYTES < threshold, _BYTES, 255 - _BYTES).take(image)


def _contrast(image: np.ndarray, factor: float) -> np.ndarray:
    grey = _grey(image)
    mean = int(grey.sum() / grey.size + 0.5)  # PIL: int(ImageStat.Stat(grey).mean[0] + 0.5)
    return _blend_with_constant(mean, image, factor)


# ------------------------------------------------------------------ geometric ops (Pillow's nearest-neighbour)
def _black_bordered(image: np.ndarray) -> np.ndarray:
    """The image inside a one-pixel black frame: clipped source positions then land on black (PIL's fill)."""
    h, w = image.shape[:2]
    framed = np.zeros((h + 2, w + 2) + image.shape[2:], image.dtype)
    framed[1:-1, 1:-1] = image
    return framed


def _scale_positions(size: int, shift: float) -> np.ndarray:
    """Source indices of Pillow's scale path for a unit scale, ``shift + 0.5 + k`` accumulated as doubles and
    floored (Pillow's ``COORD``: any negative position is outside), plus one for the black frame."""
    steps = np.ones(size)
    steps[0] = shift + 0.5
    return _clamp(np.floor(np.add.accumulate(steps)).astype(np.int64) + 1, 0, size + 1)


def _translate(image: np.ndarray, dx: float, dy: float) -> np.ndarray:
    """``transform(AFFINE, (1, 0, dx, 0, 1, dy))``: rows and columns move independently."""
    h, w = image.shape[:2]
    return _black_bordered(image).take(_scale_positions(h, dy), axis=0).take(_scale_positions(w, dx), axis=1)


def _affine(image: np.ndarray, a: tuple[float, ...]) -> np.ndarray:
    """``transform(AFFINE, a)`` with a shear/rotation part: Pillow's 16.16 fixed-point nearest-neighbour path."""
    h, w = image.shape[:2]
    for x, y in ((0, 0), (w, h), (0, h), (w, 0)):
        if abs(x * a[0] + y * a[1] + a[2]) >= 32768 or abs(x * a[3] + y * a[4] + a[5]) >= 32768:
            raise ValueError(f"a {w}x{h} image is beyond the fixed-point range of Pillow's affine path ported here")

    def fix(v: float) -> int:
        return math.floor(v * 65536.0 + 0.5)

    a0, a1, a3, a4 = fix(a[0]), fix(a[1]), fix(a[3]), fix(a[4])
    a2, a5 = fix(a[2] + a[0] * 0.5 + a[1] * 0.5), fix(a[5] + a[3] * 0.5 + a[4] * 0.5)
    y, x = np.arange(h)[:, None], np.arange(w)
    # source pixel = position >> 16 (floor); + 1 for the black frame, and anything outside clips onto the frame
    src_y = _clamp((((a5 + 65536) + y * a4) + x * a3) >> 16, 0, h + 1)
    src_x = _clamp((((a2 + 65536) + y * a1) + x * a0) >> 16, 0, w + 1)
    framed = _black_bordered(image)
    return framed.reshape((h + 2) * (w + 2), -1).take(src_y * (w + 2) + src_x, axis=0).reshape(image.shape)


def _rotate(image: np.ndarray, degrees: float) -> np.ndarray:
    """``Image.rotate(degrees)`` about the centre, nearest neighbour, same size, black corners."""
    h, w = image.shape[:2]
    degrees = degrees % 360.0
    if degrees == 0:
        return image.copy()
    if degrees == 180:
        return np.ascontiguousarray(image[::-1, ::-1])
    if degrees in (90, 270) and w == h:
        return np.ascontiguousarray(np.rot90(image, 1 if degrees == 90 else 3))
    # the same float expressions, in the same order, as Image.rotate builds its matrix
    angle = -math.radians(degrees)
    a, b, d, e = (round(math.cos(angle), 15), round(math.sin(angle), 15), round(-math.sin(angle), 15),
                  round(math.cos(angle), 15))
    cx, cy = w / 2, h / 2
    return _affine(image, (a, b, a * -cx + b * -cy + 0.0 + cx, d, e, d * -cx + e * -cy + 0.0 + cy))


def _shear(image: np.ndarray, a: tuple[float, ...]) -> np.ndarray:
    return _affine(image, a) if a[1] or a[3] else image.copy()


_OPS: dict[str, Callable[[np.ndarray, float], np.ndarray]] = {
    "AutoContrast": _autocontrast,
    "Brightness": lambda img, v: _blend_with_constant(0, img, v),
    "Color": lambda img, v: _blend(_grey(img)[..., None] if img.ndim == 3 else img, img, v),
    "Contrast": _contrast,
    "Equalize": _equalize,
    "Identity": lambda img, v: img,
    "Posterize": _posterize,
    "Rotate": _rotate,
    "Sharpness": lambda img, v: _blend(_smooth(img), img, v),
    "ShearX": lambda img, v: _shear(img, (1.0, v, 0.0, 0.0, 1.0, 0.0)),
    "ShearY": lambda img, v: _shear(img, (1.0, 0.0, 0.0, v, 1.0, 0.0)),
    "Solarize": _solarize,
    "TranslateX": lambda img, v: _translate(img, v * img.shape[1], 0.0),
    "TranslateY": lambda img, v: _translate(img, 0.0, v * img.shape[0]),
}


def apply_op(image: np.ndarray, name: str, magnitude: float) -> np.ndarray:
    """One RandAugment op at a given magnitude on a uint8 HWC (or HW) image; equals the PIL op (module docstring)."""
    return _OPS[name](image, magnitude)


def cutout(image: np.ndarray, size_fraction: float, rng: random.Random, fill=CUTOUT_FILL) -> np.ndarray:
    """Fill a square of side ``size_fraction * width`` centred uniformly at random, clipped at the border.

    As the official code draws it with PIL: corners truncated to integers and both included.
    """
    if size_fraction <= 0:
        return image
    h, w = image.shape[:2]
    side = size_fraction * w
    x0 = int(max(0, rng.uniform(0, w) - side / 2))
    y0 = int(max(0, rng.uniform(0, h) - side / 2))
    x1, y1 = int(min(w, x0 + side)), int(min(h, y0 + side))
    out = image.copy()
    out[y0 : y1 + 1, x0 : x1 + 1] = fill if image.ndim == 3 else int(np.mean(fill))
    return out


class StrongView(View):
    """Weak view, then ``num_ops`` RandAugment ops with random magnitudes, then Cutout.

    ``num_ops=2`` follows the FixMatch paper; USB's CIFAR configs use 3. Ops are drawn with replacement
    (``random.choices``, as in USB). Cutout's side is drawn from ``U[0, cutout_max]`` of the image width (paper
    Table 12, USB).
    """

    def __init__(self, num_ops: int = 2, cutout_max: float = 0.5, pad_fraction: float = 0.125, flip: bool = True,
                 ops: tuple[str, ...] = tuple(RANDAUGMENT_OPS)):
        unknown = set(ops) - set(RANDAUGMENT_OPS)
        if unknown:
            raise ValueError(f"unknown RandAugment ops {sorted(unknown)}; known: {sorted(RANDAUGMENT_OPS)}")
        self.num_ops, self.cutout_max = num_ops, cutout_max
        self.pad_fraction, self.flip, self.ops = pad_fraction, flip, tuple(ops)

    def draw_ops(self, rng: random.Random) -> list[tuple[str, float]]:
        """The ops of one sample and their magnitudes, each uniform in its ``RANDAUGMENT_OPS`` range."""
        drawn = []
        for name in rng.choices(self.ops, k=self.num_ops):
            low, high = RANDAUGMENT_OPS[name]
            drawn.append((name, low + (high - low) * rng.random()))
        return drawn

    def __call__(self, image, rng):
        image = flip_and_crop(image, rng, self.pad_fraction, self.flip)
        for name, magnitude in self.draw_ops(rng):
            image = apply_op(image, name, magnitude)
        return cutout(image, rng.random() * self.cutout_max, rng)
