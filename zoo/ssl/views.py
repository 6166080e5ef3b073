"""Multi-view augmentation of joint-embedding methods, on uint8 HWC images in the dataloader workers.

Same conventions as ``zoo/core/views.py``: a view is ``view(image, rng) -> image`` on one uint8 HWC numpy image,
all randomness from ``rng`` (the per-sample ``random.Random`` the sampler seeds), so a sample's views depend only
on (seed, epoch, position); ``ViewDataset`` returns each named view as a uint8 CHW tensor, normalised later on the
device.

:class:`SSLView` is one view of the SimCLR/BYOL pipeline, in the official codes' order (SimCLR
``data_util.preprocess_for_train`` + ``batch_random_blur``; BYOL ``augmentations.postprocess``):

1. random resized crop (area fraction ``U(crop_scale)``, log-uniform aspect ratio in ``crop_ratio``; torchvision's
   sampler: 10 tries, then a centred crop) resized bicubically (PIL) to ``size``;
2. horizontal flip with probability ``flip_p``;
3. colour jitter with probability ``color_jitter_p``: brightness, contrast, saturation, hue in a random order, each
   clipped to [0, 1] (the TF ops: brightness additive ``x + U(-b, b)`` as BYOL and SimCLR v1, or multiplicative
   ``x * U(1 - b, 1 + b)`` as SimCLR's code default; contrast ``(x - mean_c) f + mean_c`` per channel; saturation
   and hue in HSV); then grayscale with probability ``grayscale_p`` (independently of the jitter);
4. Gaussian blur with probability ``blur_p``: sigma ``U(0.1, 2.0)``, a separable kernel of ``2 * int(side / 20) + 1``
   taps (the official "kernel size = 10 % of the side"), zero padding (TF ``SAME``);
5. solarisation with probability ``solarize_p``: ``x if x < 0.5 else 1 - x``.

Steps 3-5 run in float32 on [0, 1] as the official codes do, and the view is rounded back to uint8 once at the end
(an error of at most half a grey level, the same quantisation every stored image already has).

Presets (:class:`BYOLViews`, :class:`SimCLRViews`) give each paper's parameters; :class:`MultiView` is the dict of
named views a data module serves (``view1``, ``view2``, and optional multi-crop ``local_<i>``).
"""
from __future__ import annotations

import random
from typing import Literal

import numpy as np
from PIL import Image

from zoo.core.views import View, random_resized_box

__all__ = ["random_resized_crop", "adjust_brightness", "adjust_contrast", "adjust_saturation", "adjust_hue",
           "to_grayscale", "gaussian_blur", "solarize", "rgb_to_hsv", "hsv_to_rgb", "SSLView", "MultiView",
           "BYOLViews", "SimCLRViews", "SupervisedViews"]

# ITU-R 601 luma as TF's rgb_to_grayscale weighs it (the BYOL and SimCLR codes)
GRAYSCALE_WEIGHTS = np.array([0.2989, 0.5870, 0.1140], np.float32)


# --------------------------------------------------------------------------------------------- geometry (uint8)
def random_resized_crop(image: np.ndarray, rng: random.Random, size: int | None = None,
                        scale: tuple[float, float] = (0.08, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> np.ndarray:
    """A crop of ``U(scale)`` of the area and log-uniform aspect ratio (width / height) in ``ratio``, resized
    bicubically to ``size`` x ``size`` (``None``: the image's own height). torchvision's ``RandomResizedCrop``
    sampler: 10 tries, then the largest centred crop within ``ratio``."""
    h, w = image.shape[:2]
    size = size or h
    top, left, crop_h, crop_w = random_resized_box(h, w, rng, scale, ratio)
    box = (left, top, left + crop_w, top + crop_h)
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC, box=box))


# ------------------------------------------------------------------------------ colour (float32 HWC in [0, 1])
def adjust_brightness(x: np.ndarray, amount: float, mode: Literal["additive", "multiplicative"]) -> np.ndarray:
    """``x + amount`` (additive) or ``x * amount`` (multiplicative)."""
    return x + np.float32(amount) if mode == "additive" else x * np.float32(amount)


def adjust_contrast(x: np.ndarray, factor: float) -> np.ndarray:
    """TF's ``adjust_contrast``: each channel's pixels moved away from (or towards) that channel's mean."""
    mean = x.mean(axis=(0, 1), keepdims=True)
    return (x - mean) * np.float32(factor) + mean


def rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
    """RGB -> HSV on [0, 1] (the standard hexcone model, as TF and ``colorsys``), hue in [0, 1)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    value = rgb.max(axis=-1)
    chroma = value - rgb.min(axis=-1)
    safe = np.where(chroma > 0, chroma, 1)
    hue = np.where(value == r, (g - b) / safe, np.where(value == g, (b - r) / safe + 2, (r - g) / safe + 4))
    hue = np.where(chroma > 0, (hue / 6) % 1.0, 0)
    saturation = np.where(value > 0, chroma / np.where(value > 0, value, 1), 0)
    return np.stack([hue, saturation, value], axis=-1).astype(np.float32)


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """HSV -> RGB on [0, 1], the inverse of :func:`rgb_to_hsv`."""
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    sector = (h % 1.0) * 6
    chroma = s * v
    x = chroma * (1 - np.abs(sector % 2 - 1))
    zero = np.zeros_like(h)
    index = np.floor(sector).astype(np.int64) % 6
    r = np.choose(index, [chroma, x, zero, zero, x, chroma])
    g = np.choose(index, [x, chroma, chroma, x, zero, zero])
    b = np.choose(index, [zero, zero, x, chroma, chroma, x])
    return (np.stack([r, g, b], axis=-1) + (v - chroma)[..., None]).astype(np.float32)


def adjust_saturation(x: np.ndarray, factor: float) -> np.ndarray:
    """Saturation times ``factor`` in HSV, clipped to [0, 1] (TF's ``adjust_saturation``)."""
    hsv = rgb_to_hsv(x)
    hsv[..., 1] = np.clip(hsv[..., 1] * np.float32(factor), 0, 1)
    return hsv_to_rgb(hsv)


def adjust_hue(x: np.ndarray, delta: float) -> np.ndarray:
    """Hue rotated by ``delta`` (a fraction of the colour wheel) in HSV (TF's ``adjust_hue``)."""
    hsv = rgb_to_hsv(x)
    hsv[..., 0] = (hsv[..., 0] + np.float32(delta)) % 1.0
    return hsv_to_rgb(hsv)


def to_grayscale(x: np.ndarray) -> np.ndarray:
    """Luma (TF's weights) on all three channels."""
    return np.repeat((x @ GRAYSCALE_WEIGHTS)[..., None], 3, axis=-1)


def gaussian_blur(x: np.ndarray, sigma: float, radius: int) -> np.ndarray:
    """Separable Gaussian blur, ``2 * radius + 1`` taps normalised to sum 1, zero padding (TF's ``SAME``)."""
    if radius <= 0:
        return x
    taps = np.arange(-radius, radius + 1, dtype=np.float32)
    kernel = np.exp(-taps ** 2 / (2 * np.float32(sigma) ** 2))
    kernel /= kernel.sum()
    h, w = x.shape[:2]
    padded = np.pad(x, ((radius, radius), (radius, radius), (0, 0)))
    rows = sum(kernel[i] * padded[:, i : i + w] for i in range(2 * radius + 1))  # horizontal pass
    return sum(kernel[i] * rows[i : i + h] for i in range(2 * radius + 1)).astype(np.float32)  # vertical pass


def solarize(x: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    return np.where(x < threshold, x, 1 - x)


# ------------------------------------------------------------------------------------------------------ views
class SSLView(View):
    """One augmented view (the pipeline of the module docstring). Defaults are BYOL's first view (Grill et al.
    2020, Table 6; the official ``augment_config["view1"]``): jitter (0.4, 0.4, 0.2, 0.1) additive brightness with
    p 0.8, grayscale p 0.2, blur p 1.0, no solarisation.

    Args:
        size: output side (``None``: the input's height).
        crop_scale, crop_ratio: random resized crop's area fraction and aspect-ratio ranges.
        flip_p: horizontal flip probability.
        brightness, contrast, saturation, hue: jitter ranges (brightness ``U(-b, b)`` added or a factor
            ``U(1 - b, 1 + b)``; contrast and saturation factors ``U(1 - c, 1 + c)``; hue shift ``U(-h, h)``); 0 skips.
        brightness_mode: ``additive`` (BYOL, SimCLR v1) or ``multiplicative`` (SimCLR's code default).
        color_jitter_p, grayscale_p: probabilities of the jitter and of grayscale.
        blur_p, blur_sigma, blur_kernel_fraction: blur probability, sigma range, kernel size as a fraction of the
            side (radius ``int(fraction * side / 2)``).
        solarize_p, solarize_threshold: solarisation probability and threshold (on [0, 1]).
    """

    def __init__(self, size: int | None = None, crop_scale: tuple[float, float] = (0.08, 1.0),
                 crop_ratio: tuple[float, float] = (3 / 4, 4 / 3), flip_p: float = 0.5, brightness: float = 0.4,
                 contrast: float = 0.4, saturation: float = 0.2, hue: float = 0.1,
                 brightness_mode: Literal["additive", "multiplicative"] = "additive", color_jitter_p: float = 0.8,
                 grayscale_p: float = 0.2, blur_p: float = 1.0, blur_sigma: tuple[float, float] = (0.1, 2.0),
                 blur_kernel_fraction: float = 0.1, solarize_p: float = 0.0, solarize_threshold: float = 0.5):
        if brightness_mode not in ("additive", "multiplicative"):
            raise ValueError(f"brightness_mode must be 'additive' or 'multiplicative', got {brightness_mode!r}")
        if not 0 < crop_scale[0] <= crop_scale[1] <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {crop_scale}")
        self.size, self.crop_scale, self.crop_ratio, self.flip_p = size, tuple(crop_scale), tuple(crop_ratio), flip_p
        self.brightness, self.contrast, self.saturation, self.hue = brightness, contrast, saturation, hue
        self.brightness_mode, self.color_jitter_p, self.grayscale_p = brightness_mode, color_jitter_p, grayscale_p
        self.blur_p, self.blur_sigma, self.blur_kernel_fraction = blur_p, tuple(blur_sigma), blur_kernel_fraction
        self.solarize_p, self.solarize_threshold = solarize_p, solarize_threshold

    def color_jitter(self, x: np.ndarray, rng: random.Random) -> np.ndarray:
        """The four jitter ops in a random order, each clipped to [0, 1] (as the official codes)."""
        ops = [0, 1, 2, 3]
        rng.shuffle(ops)
        for op in ops:
            if op == 0 and self.brightness > 0:
                amount = (rng.uniform(-self.brightness, self.brightness) if self.brightness_mode == "additive"
                          else rng.uniform(max(0.0, 1 - self.brightness), 1 + self.brightness))
                x = adjust_brightness(x, amount, self.brightness_mode)
            elif op == 1 and self.contrast > 0:
                x = adjust_contrast(x, rng.uniform(1 - self.contrast, 1 + self.contrast))
            elif op == 2 and self.saturation > 0:
                x = adjust_saturation(x, rng.uniform(1 - self.saturation, 1 + self.saturation))
            elif op == 3 and self.hue > 0:
                x = adjust_hue(x, rng.uniform(-self.hue, self.hue))
            x = np.clip(x, 0, 1)
        return x

    def __call__(self, image: np.ndarray, rng: random.Random) -> np.ndarray:
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"SSLView takes uint8 HWC RGB images, got {image.dtype} {image.shape}")
        image = random_resized_crop(image, rng, self.size, self.crop_scale, self.crop_ratio)
        if rng.random() < self.flip_p:
            image = image[:, ::-1]
        x = image.astype(np.float32) / 255
        if rng.random() < self.color_jitter_p:
            x = self.color_jitter(x, rng)
        if rng.random() < self.grayscale_p:
            x = to_grayscale(x)
        if rng.random() < self.blur_p:
            radius = int(self.blur_kernel_fraction * x.shape[0] / 2)
            x = gaussian_blur(x, rng.uniform(*self.blur_sigma), radius)
        if rng.random() < self.solarize_p:
            x = solarize(x, self.solarize_threshold)
        return np.rint(np.clip(x, 0, 1) * 255).astype(np.uint8)


class MultiView:
    """The named views of one image: ``views`` (e.g. ``{"view1": ..., "view2": ...}``) plus ``num_local_views``
    multi-crop views ``local_0``, ``local_1``, ... of ``local_view`` (e.g. 6 x 96 px crops of area (0.05, 0.4)
    beside 2 x 224 px, SwAV/DINO-style). A data module hands :meth:`named_views` to ``ViewDataset``, which draws
    them in this order from the sample's one ``rng``; calling the object does the same on one image."""

    def __init__(self, views: dict[str, View], local_view: View | None = None, num_local_views: int = 0):
        if not views:
            raise ValueError("MultiView needs at least one named view")
        if num_local_views and local_view is None:
            raise ValueError(f"num_local_views={num_local_views} needs a local_view")
        self.views, self.local_view, self.num_local_views = dict(views), local_view, num_local_views

    def named_views(self) -> dict[str, View]:
        local = {f"local_{i}": self.local_view for i in range(self.num_local_views)}
        return {**self.views, **local}

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.named_views())

    def __call__(self, image: np.ndarray, rng: random.Random) -> dict[str, np.ndarray]:
        return {name: view(image, rng) for name, view in self.named_views().items()}


class BYOLViews(MultiView):
    """BYOL's asymmetric pair (Grill et al. 2020, Table 6): blur 1.0 / 0.1, solarisation 0.0 / 0.2, the rest as
    :class:`SSLView`'s defaults. ``size``: output side (``None``: the input's)."""

    def __init__(self, size: int | None = None, crop_scale: tuple[float, float] = (0.08, 1.0),
                 local_view: View | None = None, num_local_views: int = 0):
        super().__init__({"view1": SSLView(size, crop_scale, blur_p=1.0, solarize_p=0.0),
                          "view2": SSLView(size, crop_scale, blur_p=0.1, solarize_p=0.2)},
                         local_view, num_local_views)


class SimCLRViews(MultiView):
    """SimCLR's two identically distributed views (Chen et al. 2020, Appendix A; official ``data_util``): colour
    jitter of strength ``s`` = (0.8 s, 0.8 s, 0.8 s, 0.2 s) with multiplicative brightness (the code's default
    ``simclrv2`` implementation) and p 0.8, grayscale p 0.2, blur p ``blur_p``, no solarisation.

    Defaults are the CIFAR-10 setting (Appendix B.9, the official README's CIFAR command): strength 0.5, no blur.
    ImageNet: ``color_strength=1.0, blur_p=0.5``.
    """

    def __init__(self, size: int | None = None, color_strength: float = 0.5, blur_p: float = 0.0,
                 crop_scale: tuple[float, float] = (0.08, 1.0), local_view: View | None = None,
                 num_local_views: int = 0):
        s = color_strength

        def view() -> SSLView:
            return SSLView(size, crop_scale, brightness=0.8 * s, contrast=0.8 * s, saturation=0.8 * s, hue=0.2 * s,
                           brightness_mode="multiplicative", blur_p=blur_p, solarize_p=0.0)

        super().__init__({"view1": view(), "view2": view()}, local_view, num_local_views)


class SupervisedViews(MultiView):
    """The one view of the family's supervised reference encoder (``zoo.ssl.hosts.Supervised``): the standard
    supervised ImageNet augmentation, random resized crop (area ``crop_scale``) and horizontal flip, no colour
    distortion; ``view1`` only, so the workers augment each image once."""

    def __init__(self, size: int | None = None, crop_scale: tuple[float, float] = (0.08, 1.0)):
        super().__init__({"view1": SSLView(size, crop_scale, color_jitter_p=0.0, grayscale_p=0.0, blur_p=0.0,
                                           solarize_p=0.0)})
