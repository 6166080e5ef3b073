"""The numpy views against straightforward per-image PIL references, and their sampling distribution.

Reference: each RandAugment op as USB's ``semilearn/datasets/augmentation/randaugment.py`` (commit 1ef4cbe) calls
PIL, on real CIFAR-10 images (the offline subset). Tolerance: **0 for every op, Cutout and whole views** — the
numpy port follows Pillow's own arithmetic (integer luma, float32 blend truncation, LUTs clipped like
``Image.point``, 16.16 fixed-point / accumulated-double nearest-neighbour affine), so there is no resampling or
rounding convention left to differ; the one float-vs-integer substitution (SMOOTH's /13 rounding) cannot differ
because a sum over 13 never lies within float32 error of a half. A Pillow release that changes its arithmetic
would fail these tests, which is the intent.

Distribution tests use fixed seeds, so they are deterministic; each is paired with a deliberately biased sampler
that must fail the same test, which shows the test has the power to catch that bias.
"""
from __future__ import annotations

import random

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageEnhance, ImageOps
from scipy import stats
from torch.utils.data import DataLoader

from zoo.tools.bench_data import measure_loader
from zoo.core.data import ViewDataset
from zoo.core.datasets import load_image_set
from zoo.core.views import RANDAUGMENT_OPS, StrongView, WeakView, apply_op, cutout

ALPHA = 1e-3  # a correct sampler passes at this level ...
POWER = 1e-6  # ... and a biased one must fall below this


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return load_image_set("cifar10_subset").x_train[:64]


# ------------------------------------------------------------------------------------------- PIL references
def _pil_affine(img, coeffs):
    return img.transform(img.size, Image.AFFINE, coeffs)


PIL_OPS = {
    "AutoContrast": lambda img, v: ImageOps.autocontrast(img),
    "Brightness": lambda img, v: ImageEnhance.Brightness(img).enhance(v),
    "Color": lambda img, v: ImageEnhance.Color(img).enhance(v),
    "Contrast": lambda img, v: ImageEnhance.Contrast(img).enhance(v),
    "Equalize": lambda img, v: ImageOps.equalize(img),
    "Identity": lambda img, v: img,
    "Posterize": lambda img, v: ImageOps.posterize(img, max(1, int(v))),
    "Rotate": lambda img, v: img.rotate(v),
    "Sharpness": lambda img, v: ImageEnhance.Sharpness(img).enhance(v),
    "ShearX": lambda img, v: _pil_affine(img, (1, v, 0, 0, 1, 0)),
    "ShearY": lambda img, v: _pil_affine(img, (1, 0, 0, v, 1, 0)),
    "Solarize": lambda img, v: ImageOps.solarize(img, v),
    "TranslateX": lambda img, v: _pil_affine(img, (1, 0, v * img.size[0], 0, 1, 0)),
    "TranslateY": lambda img, v: _pil_affine(img, (1, 0, 0, 0, 1, v * img.size[1])),
}


def pil_op(image: np.ndarray, name: str, magnitude: float) -> np.ndarray:
    return np.asarray(PIL_OPS[name](Image.fromarray(image), magnitude))


def pil_cutout(image: np.ndarray, size_fraction: float, rng: random.Random) -> np.ndarray:
    """USB's CutoutAbs with the centre drawn from ``rng`` (uniform over the image, as the paper describes)."""
    if size_fraction <= 0:
        return image
    img = Image.fromarray(image)
    w, h = img.size
    side = size_fraction * w
    x0 = int(max(0, rng.uniform(0, w) - side / 2))
    y0 = int(max(0, rng.uniform(0, h) - side / 2))
    ImageDraw.Draw(img).rectangle((x0, y0, min(w, x0 + side), min(h, y0 + side)),
                                  (125, 123, 114) if img.mode == "RGB" else 120)
    return np.asarray(img)


def reference_weak(image: np.ndarray, rng: random.Random, pad: int = 4) -> np.ndarray:
    if rng.random() < 0.5:
        image = image[:, ::-1]
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
    top, left = rng.randint(0, 2 * pad), rng.randint(0, 2 * pad)
    return padded[top : top + image.shape[0], left : left + image.shape[1]]


def reference_strong(image: np.ndarray, rng: random.Random, num_ops: int) -> np.ndarray:
    """Weak view, ``num_ops`` ops with replacement and uniform magnitudes (USB's RandAugment), Cutout U[0, 0.5]."""
    image = np.ascontiguousarray(reference_weak(image, rng))
    for name in rng.choices(list(RANDAUGMENT_OPS), k=num_ops):
        low, high = RANDAUGMENT_OPS[name]
        image = pil_op(image, name, low + (high - low) * rng.random())
    return pil_cutout(image, rng.random() * 0.5, rng)


# --------------------------------------------------------------------------------- equality with PIL
@pytest.mark.parametrize("name", list(RANDAUGMENT_OPS))
def test_op_equals_pil_on_real_images(images, name):
    low, high = RANDAUGMENT_OPS[name]
    magnitudes = list(np.linspace(low, high, 9)) + [low + (high - low) * random.Random(i).random() for i in range(4)]
    for i, image in enumerate(images):
        for magnitude in magnitudes[i % 3 :: 3]:
            np.testing.assert_array_equal(apply_op(image, name, magnitude), pil_op(image, name, magnitude),
                                          err_msg=f"{name}({magnitude}) on image {i}")
        grey = np.ascontiguousarray(image[..., 1])
        np.testing.assert_array_equal(apply_op(grey, name, magnitudes[i % 13]), pil_op(grey, name, magnitudes[i % 13]),
                                      err_msg=f"{name} on grey image {i}")


@pytest.mark.parametrize("name, magnitude", [
    ("Rotate", 0.0), ("Rotate", 90.0), ("Rotate", 180.0), ("Rotate", -90.0), ("Rotate", 137.0), ("ShearX", 0.0),
    ("ShearY", 0.0), ("TranslateX", 0.0), ("TranslateY", 0.9), ("Brightness", 1.6), ("Color", 1.8),
    ("Contrast", 2.5), ("Sharpness", 1.9), ("Sharpness", 0.0), ("Solarize", 0.0), ("Solarize", 256.0),
    ("Posterize", 1.0), ("Posterize", 8.0)])
def test_op_equals_pil_outside_the_training_ranges(images, name, magnitude):
    """Extrapolating blends (clipped), quarter turns (Pillow's transpose shortcuts), no-ops and extreme levels."""
    for image in images[:8]:
        np.testing.assert_array_equal(apply_op(image, name, magnitude), pil_op(image, name, magnitude))


def test_geometric_ops_equal_pil_on_a_non_square_image(images):
    wide = np.ascontiguousarray(np.concatenate([images[0], images[1]], axis=1)[:20])  # 20 x 64
    for name in ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY", "Sharpness"):
        low, high = RANDAUGMENT_OPS[name]
        for magnitude in np.linspace(low, high, 7):
            np.testing.assert_array_equal(apply_op(wide, name, magnitude), pil_op(wide, name, magnitude))


@pytest.mark.parametrize("size_fraction", [0.0, 0.01, 0.1, 0.25, 0.5, 1.0])
def test_cutout_equals_pil_rectangle(images, size_fraction):
    for seed, image in enumerate(images):
        for img in (image, np.ascontiguousarray(image[..., 0])):
            out = cutout(img, size_fraction, random.Random(seed))
            np.testing.assert_array_equal(out, pil_cutout(img, size_fraction, random.Random(seed)))


@pytest.mark.parametrize("num_ops", [2, 3])
def test_views_equal_their_pil_reference_for_the_same_seed(images, num_ops):
    weak, strong = WeakView(), StrongView(num_ops=num_ops)
    for seed in range(200):
        image = images[seed % len(images)]
        np.testing.assert_array_equal(weak(image, random.Random(seed)), reference_weak(image, random.Random(seed)))
        np.testing.assert_array_equal(strong(image, random.Random(seed)),
                                      reference_strong(image, random.Random(seed), num_ops))


# ------------------------------------------------------------------------------------------ distributions
def weak_view_draws(view, image: np.ndarray, draws: int) -> np.ndarray:
    """(flipped, top, left) of each output, identified among all 2 x 9 x 9 flip/pad-4/crop candidates."""
    candidates, params = [], []
    for flipped in (0, 1):
        padded = np.pad(image[:, ::-1] if flipped else image, ((4, 4), (4, 4), (0, 0)), mode="reflect")
        for top in range(9):
            for left in range(9):
                candidates.append(padded[top : top + 32, left : left + 32])
                params.append((flipped, top, left))
    candidates = np.stack(candidates)
    found = []
    for seed in range(draws):
        match = np.flatnonzero((candidates == view(image, random.Random(seed))).all(axis=(1, 2, 3)))
        assert len(match) == 1, "the output is not exactly one flip + reflect-pad-4 + crop of the image"
        found.append(params[match[0]])
    return np.array(found)


def weak_pvalues(draws: np.ndarray) -> list[float]:
    flips, tops, lefts = draws.T
    return [stats.binomtest(int(flips.sum()), len(flips), 0.5).pvalue,
            stats.chisquare(np.bincount(tops, minlength=9)).pvalue,
            stats.chisquare(np.bincount(lefts, minlength=9)).pvalue]


class _BiasedWeak(WeakView):
    """Flip with p=0.6 and crop offsets drawn from 0..7 instead of 0..8."""

    def __call__(self, image, rng):
        image = image[:, ::-1] if rng.random() < 0.6 else image
        padded = np.pad(image, ((4, 4), (4, 4), (0, 0)), mode="reflect")
        top, left = rng.randint(0, 7), rng.randint(0, 7)
        return padded[top : top + 32, left : left + 32]


def test_weak_view_is_flip_half_the_time_and_a_uniform_reflect_pad_4_crop(images):
    assert min(weak_pvalues(weak_view_draws(WeakView(), images[3], 3000))) > ALPHA
    assert max(weak_pvalues(weak_view_draws(_BiasedWeak(), images[3], 3000))) < POWER


def op_draws(view: StrongView, samples: int, seed: int = 0) -> list[list[tuple[str, float]]]:
    rng = random.Random(seed)
    return [view.draw_ops(rng) for _ in range(samples)]


def op_frequency_pvalue(draws) -> float:
    names = list(RANDAUGMENT_OPS)
    counts = np.bincount([names.index(name) for ops in draws for name, _ in ops], minlength=len(names))
    return stats.chisquare(counts).pvalue  # uniform over the 14 ops


def repeat_pvalue(draws) -> float:
    """Ops are drawn with replacement: both ops of a sample are the same op with probability 1/14."""
    repeats = sum(ops[0][0] == ops[1][0] for ops in draws)
    return stats.binomtest(repeats, len(draws), 1 / len(RANDAUGMENT_OPS)).pvalue


class _WithoutReplacement(StrongView):
    def draw_ops(self, rng):
        return [(name, RANDAUGMENT_OPS[name][0]) for name in rng.sample(self.ops, self.num_ops)]


def test_ops_are_drawn_uniformly_with_replacement():
    draws = op_draws(StrongView(num_ops=2), 14_000)
    assert op_frequency_pvalue(draws) > ALPHA and repeat_pvalue(draws) > ALPHA
    one_op_twice_as_likely = StrongView(num_ops=2, ops=tuple(RANDAUGMENT_OPS) + ("Rotate",))
    assert op_frequency_pvalue(op_draws(one_op_twice_as_likely, 14_000)) < POWER
    assert repeat_pvalue(op_draws(_WithoutReplacement(num_ops=2), 14_000)) < POWER


def magnitude_pvalues(draws) -> dict[str, float]:
    by_op: dict[str, list[float]] = {name: [] for name in RANDAUGMENT_OPS}
    for ops in draws:
        for name, magnitude in ops:
            by_op[name].append(magnitude)
    pvalues = {}
    for name, magnitudes in by_op.items():
        low, high = RANDAUGMENT_OPS[name]
        assert low <= min(magnitudes) and max(magnitudes) < high, name
        pvalues[name] = stats.kstest(magnitudes, stats.uniform(low, high - low).cdf).pvalue
    return pvalues


class _SkewedMagnitudes(StrongView):
    def draw_ops(self, rng):
        drawn = []
        for name in rng.choices(self.ops, k=self.num_ops):
            low, high = RANDAUGMENT_OPS[name]
            drawn.append((name, low + (high - low) * rng.random() ** 1.3))
        return drawn


def test_magnitudes_are_uniform_within_each_range():
    assert min(magnitude_pvalues(op_draws(StrongView(num_ops=2), 14_000)).values()) > ALPHA / len(RANDAUGMENT_OPS)
    assert max(magnitude_pvalues(op_draws(_SkewedMagnitudes(num_ops=2), 14_000)).values()) < POWER


# --------------------------------------------------------------------------------------------- determinism
def test_views_depend_only_on_their_rng(images):
    before = images.copy()
    for view in (WeakView(), StrongView(), StrongView(num_ops=3)):
        first = [view(image, random.Random(seed)) for seed, image in enumerate(images)]
        random.seed(123)
        np.random.seed(123)
        again = [view(image, random.Random(seed)) for seed, image in enumerate(images)]
        other = [view(image, random.Random(seed + 1000)) for seed, image in enumerate(images)]
        assert all(np.array_equal(a, b) for a, b in zip(first, again))
        assert all(a.dtype == np.uint8 and a.shape == (32, 32, 3) and a.flags.c_contiguous for a in first)
        assert sum(np.array_equal(a, b) for a, b in zip(first, other)) <= 2
    np.testing.assert_array_equal(images, before)  # the dataset's arrays are never written to


def test_measure_loader_counts_samples_and_cpu(images):
    dataset = ViewDataset(images, np.zeros(len(images), np.int64), {"weak": WeakView(), "strong": StrongView()})
    loader = DataLoader(dataset, batch_size=8, drop_last=True)
    result = measure_loader(loader, batches=12, warmup=1, min_seconds=0)  # re-iterates past the 8-batch epoch
    assert result["samples"] == 96 and result["wall_s"] > 0 and result["samples_per_s"] > 0
