"""The soft-label store: FKD's region-level labels, generated once by a teacher and read by every student run.

For every training image the store holds ``R`` random-resized crops and the teacher's label of each, in the format
of the official FKD soft labels (``szq0214/FKD``, ``FKD_SLG/generate_soft_label.py``): the crop coordinates
``(top/H, left/W, height/H, width/W)``, the flip bit, and the teacher's top-k probabilities (class indices and values,
``marginal_smoothing_k5``); the student recovers a full distribution by spreading the remaining mass uniformly over
the other classes (``utils_FKD.Recover_soft_label``). FerKD ranks an image's crops by the teacher's probability of the
ground-truth class, so the store also keeps that probability (``gt_prob``), from the full softmax.

One file (``torch.save`` of a dict) holds the whole store: fine for CIFAR-sized sets; ImageNet would want FKD's one
file per image. ``fingerprint`` ties a store to the exact training images and labels it was made for.
"""
from __future__ import annotations

import hashlib
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from zoo.core.views import random_resized_box

__all__ = ["FORMAT", "sample_crop_boxes", "crop_view", "topk_quantise", "recover_soft_label", "fingerprint",
           "build_store", "save_store", "load_store"]

FORMAT = "fkd-topk-v1"


def sample_crop_boxes(height: int, width: int, count: int, rng: random.Random,
                      scale: tuple[float, float] = (0.08, 0.936), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                      flip_p: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """``count`` RandomResizedCrop boxes and flips, as FKD's ``RandomResizedCropWithCoords`` records them:
    coordinates ``(i / H, j / W, h / H, w / W)`` (top, left, height, width as fractions of the image), float32,
    and a bool flip per crop. The box sampler is torchvision's (10 tries, then the largest centred crop within
    ``ratio``); FKD's default area range for its EfficientNet-L2 teacher is ``(0.08, 0.936)``."""
    coords, flips = np.zeros((count, 4), np.float32), np.zeros(count, bool)
    for n in range(count):
        i, j, h, w = random_resized_box(height, width, rng, scale, ratio)
        coords[n] = (i / height, j / width, h / height, w / width)
        flips[n] = rng.random() < flip_p
    return coords, flips


def crop_view(image: np.ndarray, coords: np.ndarray, flip: bool, size: int) -> torch.Tensor:
    """The crop a stored record describes, as a uint8 CHW tensor of ``size`` x ``size``: the box
    ``round(coords * (H, W, H, W))`` (PIL's crop rounds FKD's fractional box the same way), bilinear resize
    (FKD's student transform), then the flip. Generation and training both call this, so the student sees
    exactly the pixels the teacher labelled."""
    height, width = image.shape[:2]
    top, left = int(round(float(coords[0]) * height)), int(round(float(coords[1]) * width))
    h = max(1, int(round(float(coords[2]) * height)))
    w = max(1, int(round(float(coords[3]) * width)))
    box = torch.from_numpy(np.ascontiguousarray(image[top : top + h, left : left + w])).permute(2, 0, 1)
    resized = F.interpolate(box[None].float(), size=(size, size), mode="bilinear", align_corners=False,
                            antialias=True)[0]
    out = resized.round().clamp(0, 255).to(torch.uint8)
    return out.flip(-1) if flip else out


def topk_quantise(probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """FKD's ``label_quantization(..., 'marginal_smoothing_k5')`` for any k: the k largest probabilities of each
    row, in descending order, and their class indices."""
    values, indices = probs.float().sort(dim=-1, descending=True)
    return indices[..., :k], values[..., :k]


def recover_soft_label(indices: torch.Tensor, values: torch.Tensor, num_classes: int) -> torch.Tensor:
    """FKD's ``Recover_soft_label(..., 'marginal_smoothing_k5')``: the stored top-k values at their classes and
    ``(1 - sum(top-k)) / (C - k)`` on every other class, so each row sums to 1."""
    values = values.float()
    k = values.shape[-1]
    if num_classes <= k:
        raise ValueError(f"num_classes={num_classes} must exceed the stored top-k={k}")
    rest = (1.0 - values.sum(-1, keepdim=True)).clamp_min(0.0) / (num_classes - k)
    return rest.expand(*values.shape[:-1], num_classes).clone().scatter_(-1, indices.long(), values)


def fingerprint(images: np.ndarray, labels: np.ndarray) -> str:
    """SHA-1 of the training images and labels: a store is only valid for the exact set it was made for."""
    digest = hashlib.sha1(np.ascontiguousarray(images).tobytes())
    digest.update(np.ascontiguousarray(labels.astype(np.int64)).tobytes())
    return digest.hexdigest()


@torch.no_grad()
def build_store(teacher: torch.nn.Module, images: np.ndarray, labels: np.ndarray, mean: torch.Tensor,
                std: torch.Tensor, crops_per_image: int, top_k: int = 5, crop_size: int | None = None,
                scale: tuple[float, float] = (0.08, 0.936), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                temperature: float = 1.0, seed: int = 0, batch_images: int = 64, dataset: str = "",
                device: str | torch.device = "cpu") -> dict:
    """Sample ``crops_per_image`` crops of every image (seeded per image by ``(seed, index)``), run the teacher on
    them (eval mode, softmax at ``temperature``) and keep the top-k of each. ``mean`` / ``std``: the teacher's
    normalisation on the 0..255 scale, shape ``(1, C, 1, 1)``."""
    teacher = teacher.eval().to(device)
    n, height, width = images.shape[:3]
    size = crop_size or height
    coords = np.zeros((n, crops_per_image, 4), np.float32)
    flips = np.zeros((n, crops_per_image), bool)
    topk_index = torch.zeros(n, crops_per_image, top_k, dtype=torch.int16)
    topk_value = torch.zeros(n, crops_per_image, top_k, dtype=torch.float32)
    gt_prob = torch.zeros(n, crops_per_image, dtype=torch.float32)
    for start in range(0, n, batch_images):
        batch = range(start, min(start + batch_images, n))
        crops = []
        for index in batch:
            coords[index], flips[index] = sample_crop_boxes(height, width, crops_per_image,
                                                            random.Random(seed * 1_000_003 + index), scale, ratio)
            crops += [crop_view(images[index], c, f, size) for c, f in zip(coords[index], flips[index])]
        x = (torch.stack(crops).float().to(device) - mean.to(device)) / std.to(device)
        probs = F.softmax(teacher(x).float() / temperature, dim=-1).cpu().view(len(batch), crops_per_image, -1)
        index, value = topk_quantise(probs, top_k)
        topk_index[batch.start : batch.stop], topk_value[batch.start : batch.stop] = index.to(torch.int16), value
        y = torch.as_tensor(labels[batch.start : batch.stop]).long()
        gt_prob[batch.start : batch.stop] = probs.gather(-1, y.view(-1, 1, 1).expand(-1, crops_per_image, 1))[..., 0]
    return {"format": FORMAT, "dataset": dataset, "num_images": n, "fingerprint": fingerprint(images, labels),
            "num_classes": int(probs.shape[-1]), "crop_size": size, "scale": tuple(scale), "ratio": tuple(ratio),
            "temperature": temperature, "seed": seed, "coords": torch.from_numpy(coords),
            "flips": torch.from_numpy(flips), "topk_index": topk_index, "topk_value": topk_value, "gt_prob": gt_prob}


def save_store(store: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(store, path)
    return path


def load_store(path: str | Path) -> dict:
    store = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(store, dict) or store.get("format") != FORMAT:
        raise ValueError(f"{path} is not a FerKD soft-label store (format {FORMAT!r}); make one with "
                         "`python -m zoo.ferkd.generate`")
    return store
