"""DAVIS-2016 sequences (frames + binary masks) and the DAVIS J and F measures.

J is the region IoU; F the boundary F-measure: 1-pixel boundary maps (``seg2bmap``: a pixel whose right, lower or
lower-right neighbour differs), each matched to the other dilated by a disk of radius ceil(0.008 x image diagonal),
F = 2PR / (P + R). Both follow ``davisvideochallenge/davis2017-evaluation`` ``davis2017/metrics.py``
(``db_eval_iou``, ``db_eval_boundary``, including its empty-mask conventions); a sequence's score is the mean
over frames 1..T-2 (first and last left out, as its ``evaluation.py``), the benchmark's J&F-mean is
(mean_seq J + mean_seq F) / 2.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from zoo.core.datasets import require_file

__all__ = ["DavisSequence", "load_davis2016", "region_similarity", "boundary_map", "boundary_f_measure",
           "sequence_scores", "DAVIS_HOW"]

DAVIS_HOW = ("DAVIS-2016 val (240p copy): put JPEGImages/240p/<seq>/*.jpg, Annotations/240p/<seq>/*.png and "
             "val_subset.txt under davis2016/ (see ../shared/data/davis2016/SOURCE.md; the originals are at "
             "https://davischallenge.org/davis2016/code.html, frames 2x box-downsampled to 427x240).")


@dataclass
class DavisSequence:
    name: str
    frames: np.ndarray  # (T, H, W, 3) uint8
    masks: np.ndarray   # (T, H, W) int64 object ids, 0 = background


def load_davis2016(root: str = "davis2016", sequences: list[str] | None = None, max_frames: int | None = None,
                   resolution: str = "240p") -> list[DavisSequence]:
    """The sequences named in ``val_subset.txt`` (or ``sequences``), each cut to its first ``max_frames`` frames."""
    from PIL import Image

    base = require_file(root, DAVIS_HOW)
    names = sequences or require_file(f"{root}/val_subset.txt", DAVIS_HOW).read_text().split()
    out = []
    for name in names:
        frame_dir = require_file(f"{root}/JPEGImages/{resolution}/{name}", DAVIS_HOW)
        paths = sorted(frame_dir.glob("*.jpg"))[:max_frames]
        masks = [require_file(f"{root}/Annotations/{resolution}/{name}/{p.stem}.png", DAVIS_HOW) for p in paths]
        out.append(DavisSequence(name, np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths]),
                                 np.stack([np.asarray(Image.open(m)) for m in masks]).astype(np.int64)))
    if not out:
        raise ValueError(f"no sequences found under {base}")
    return out


def region_similarity(truth: np.ndarray, prediction: np.ndarray) -> float:
    """J: |truth & prediction| / |truth | prediction|, 1 when both are empty."""
    truth, prediction = truth.astype(bool), prediction.astype(bool)
    union = np.logical_or(truth, prediction).sum()
    return 1.0 if union == 0 else float(np.logical_and(truth, prediction).sum() / union)


def boundary_map(mask: np.ndarray) -> np.ndarray:
    """1-pixel boundaries offset half a pixel towards the origin: pixels differing from their right, lower or
    lower-right neighbour (last row/column compared along the image edge only; the corner pixel never)."""
    seg = mask.astype(bool)
    east, south, south_east = np.zeros_like(seg), np.zeros_like(seg), np.zeros_like(seg)
    east[:, :-1], south[:-1, :], south_east[:-1, :-1] = seg[:, 1:], seg[1:, :], seg[1:, 1:]
    edges = (seg ^ east) | (seg ^ south) | (seg ^ south_east)
    edges[-1, :] = seg[-1, :] ^ east[-1, :]
    edges[:, -1] = seg[:, -1] ^ south[:, -1]
    edges[-1, -1] = False
    return edges


def _disk(radius: int) -> np.ndarray:
    ys, xs = np.mgrid[-radius:radius + 1, -radius:radius + 1]
    return ys ** 2 + xs ** 2 <= radius ** 2


def boundary_f_measure(truth: np.ndarray, prediction: np.ndarray, bound_th: float = 0.008) -> float:
    """F: boundary precision/recall with a tolerance of ``bound_th`` x image diagonal pixels (or ``bound_th``
    pixels when >= 1); an empty boundary on one side gives P or R = 0 as the official code does."""
    tolerance = bound_th if bound_th >= 1 else math.ceil(bound_th * math.hypot(*truth.shape))
    pred_edges, true_edges = boundary_map(prediction), boundary_map(truth)
    disk = _disk(int(tolerance))
    pred_dilated = ndimage.binary_dilation(pred_edges, disk)
    true_dilated = ndimage.binary_dilation(true_edges, disk)
    n_pred, n_true = pred_edges.sum(), true_edges.sum()
    if n_pred == 0 or n_true == 0:
        precision, recall = (1.0 if n_pred == 0 else 0.0), (1.0 if n_true == 0 else 0.0)
    else:
        precision = (pred_edges & true_dilated).sum() / n_pred
        recall = (true_edges & pred_dilated).sum() / n_true
    return 0.0 if precision + recall == 0 else float(2 * precision * recall / (precision + recall))


def sequence_scores(truth: np.ndarray, prediction: np.ndarray) -> dict[str, float]:
    """Mean J and F of one sequence (T, H, W) label maps over objects and frames 1..T-2 (all frames after the
    first when T < 3)."""
    frames = range(1, truth.shape[0] - 1) if truth.shape[0] >= 3 else range(1, truth.shape[0])
    objects = [o for o in np.unique(truth[0]) if o != 0]
    j = [region_similarity(truth[t] == o, prediction[t] == o) for o in objects for t in frames]
    f = [boundary_f_measure(truth[t] == o, prediction[t] == o) for o in objects for t in frames]
    return {"J": float(np.mean(j)), "F": float(np.mean(f))}
