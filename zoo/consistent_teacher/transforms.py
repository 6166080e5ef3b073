"""Box-aware augmentation for the teacher (weak) and student (strong) views, with the affine matrix of each view.

The official pipeline (``ssod/datasets/pipelines/rand_aug.py``) records a 3x3 matrix per geometric op so that the
teacher's boxes, predicted on the weak view, can be moved onto the strong view (``M_strong @ inv(M_weak)``). We do
the same: every geometric op here is a matrix, the image is warped with it and the boxes are mapped through it
(corners, then their enclosing box, clipped to the image: the official ``Transform2D.transform_bboxes``).
albumentations handles boxes but does not return its matrices, and its keypoint and box conventions differ by one
pixel under flips (checked with albumentations 2.0.8), so the pseudo-box transfer could not be exact with it.

Views, as in the official COCO configs (image sizes scaled by ``short_side`` / ``max_long_side`` for CPU runs):
- labeled:  random resize, flip, one colour op;
- weak:     random resize, flip (the teacher's view);
- strong:   random resize, flip, {one colour op, one geometric op} in random order, 1-4 random erases.
"""
from __future__ import annotations

import math
import random

import numpy as np
from PIL import Image

from zoo.core.views import apply_op

__all__ = ["transform_boxes", "Augment", "LABELED", "WEAK", "STRONG", "resize_for_test", "FILL"]

FILL = 125  # the official img_fill_val for geometric ops and random erase
COLOUR_OPS = ("Identity", "AutoContrast", "Equalize", "Solarize", "Color", "Contrast", "Brightness", "Sharpness",
              "Posterize")


def transform_boxes(boxes: np.ndarray, matrix: np.ndarray, width: int, height: int) -> np.ndarray:
    """Map xyxy boxes through a 3x3 affine matrix: the enclosing box of the four mapped corners, clipped."""
    if len(boxes) == 0:
        return boxes.reshape(0, 4).astype(np.float32)
    x0, y0, x1, y1 = boxes.T
    corners = np.stack([np.stack([x0, y0], -1), np.stack([x1, y0], -1), np.stack([x0, y1], -1),
                        np.stack([x1, y1], -1)], 1)                                   # (K, 4, 2)
    mapped = corners @ matrix[:2, :2].T + matrix[:2, 2]
    out = np.concatenate([mapped.min(1), mapped.max(1)], 1)
    out[:, 0::2] = out[:, 0::2].clip(0, width)
    out[:, 1::2] = out[:, 1::2].clip(0, height)
    return out.astype(np.float32)


def _warp(image: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Warp with an output->input lookup (PIL's AFFINE takes the inverse map), same size, bilinear, fill 125."""
    inverse = np.linalg.inv(matrix)[:2].ravel()
    img = Image.fromarray(image)
    return np.asarray(img.transform(img.size, Image.AFFINE, tuple(inverse), Image.BILINEAR, fillcolor=(FILL,) * 3))


def _about_centre(linear: np.ndarray, width: int, height: int) -> np.ndarray:
    centre = np.array([[1, 0, width / 2], [0, 1, height / 2], [0, 0, 1]])
    back = np.array([[1, 0, -width / 2], [0, 1, -height / 2], [0, 0, 1]])
    return centre @ linear @ back


def _geometric_op(rng: random.Random, width: int, height: int) -> np.ndarray:
    """One of: translate x or y by up to 10%, rotate by up to 30 deg, shear x then y by up to 30 deg."""
    choice = rng.randrange(4)
    if choice == 0:
        return np.array([[1, 0, rng.uniform(-0.1, 0.1) * width], [0, 1, 0], [0, 0, 1]])
    if choice == 1:
        return np.array([[1, 0, 0], [0, 1, rng.uniform(-0.1, 0.1) * height], [0, 0, 1]])
    if choice == 2:
        angle = math.radians(rng.uniform(-30, 30))
        c, s = math.cos(angle), math.sin(angle)
        return _about_centre(np.array([[c, s, 0], [-s, c, 0], [0, 0, 1]]), width, height)
    # the official shear factor is tanh(angle in radians), not tan
    shear_x = math.tanh(-math.radians(rng.uniform(-30, 30)))
    shear_y = math.tanh(math.radians(rng.uniform(-30, 30)))
    return _about_centre(np.array([[1, 0, 0], [shear_y, 1, 0], [0, 0, 1]]) @
                         np.array([[1, shear_x, 0], [0, 1, 0], [0, 0, 1]]), width, height)


def _colour_op(image: np.ndarray, rng: random.Random) -> np.ndarray:
    """One colour op at a magnitude level in 1..9 of 10, mapped to PIL arguments as the official RandAug does."""
    name, level = rng.choice(COLOUR_OPS), rng.randint(1, 9)
    special = {"Solarize": min(int(level * 25.6), 255), "Posterize": 4 - int(level * 0.4)}
    magnitude = special.get(name, level * 0.18 + 0.1)   # ImageEnhance factor in [0.28, 1.72]
    return apply_op(image, name, magnitude)


def _erase(image: np.ndarray, rng: random.Random, max_fraction: float = 0.2) -> np.ndarray:
    """1-4 rectangles, each ``r * (h, w)`` with one ratio r ~ U[0, max_fraction], filled with 125."""
    image = image.copy()
    h, w = image.shape[:2]
    for _ in range(rng.randint(1, 4)):
        ratio = rng.uniform(0, max_fraction)
        ph, pw = int(ratio * h), int(ratio * w)
        x, y = rng.randrange(max(1, w - pw)), rng.randrange(max(1, h - ph))
        image[y:y + ph, x:x + pw] = FILL
    return image


LABELED, WEAK, STRONG = "labeled", "weak", "strong"


class Augment:
    """``augment(image, boxes, rng) -> (view, boxes, matrix)``: one of the three views, with its 3x3 matrix.

    Args:
        kind: ``labeled``, ``weak`` or ``strong``.
        short_side: the shorter side is drawn uniformly from this range (official: 400-1200)...
        max_long_side: ...unless the longer side would exceed this (official: 1333), keeping the aspect ratio.
    """

    def __init__(self, kind: str, short_side: tuple[int, int] = (400, 1200), max_long_side: int = 1333):
        if kind not in (LABELED, WEAK, STRONG):
            raise ValueError(f"kind must be labeled, weak or strong, got {kind!r}")
        self.kind, self.short_side, self.max_long_side = kind, tuple(short_side), max_long_side

    def __call__(self, image: np.ndarray, boxes: np.ndarray, rng: random.Random):
        h, w = image.shape[:2]
        short = rng.uniform(*self.short_side)
        scale = min(short / min(h, w), self.max_long_side / max(h, w))
        new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
        image = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR))
        matrix = np.diag([new_w / w, new_h / h, 1.0])
        if rng.random() < 0.5:
            image = np.ascontiguousarray(image[:, ::-1])
            matrix = np.array([[-1, 0, new_w], [0, 1, 0], [0, 0, 1]]) @ matrix
        if self.kind == LABELED:
            image = _colour_op(image, rng)
        elif self.kind == STRONG:
            geometric = _geometric_op(rng, new_w, new_h)
            colour_first = rng.random() < 0.5
            image = _colour_op(image, rng) if colour_first else image
            image, matrix = _warp(image, geometric), geometric @ matrix
            image = image if colour_first else _colour_op(image, rng)
            image = _erase(image, rng)
        return np.ascontiguousarray(image), transform_boxes(boxes, matrix, new_w, new_h), matrix


def resize_for_test(image: np.ndarray, short_side: int, max_long_side: int) -> tuple[np.ndarray, float]:
    """Keep-ratio resize to the test scale (official: 800 / 1333); returns the image and its scale factor."""
    h, w = image.shape[:2]
    scale = min(short_side / min(h, w), max_long_side / max(h, w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR)), scale
