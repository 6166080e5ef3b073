"""N-way K-shot episodes on a frozen feature bank, the inductive nearest-prototype baseline and 95 % intervals.

An episode draws N classes, then K support and Q query images of each (disjoint) from a labelled feature bank; its
labels are episode-local, 0..N-1 in the order the classes were drawn, supports first, class-major. Draws come from
one ``numpy`` generator seeded once, so episode ``e`` of a seed is the same on every machine and for every method.

Features follow SimpleShot's CL2N (the normalisation the transductive clustering papers evaluate on): subtract the
mean feature of the base-class training images, then L2-normalise each vector.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from zoo.core.data import normalise_images

__all__ = ["Episodes", "center_l2", "confidence_interval", "episode_accuracies", "extract_features",
           "nearest_prototype", "prototypes", "sample_episodes"]


@dataclass
class Episodes:
    support: np.ndarray  # (E, N*K) indices into the bank, class-major
    query: np.ndarray  # (E, N*Q) indices, class-major
    classes: np.ndarray  # (E, N) the bank's class ids, episode label n = classes[:, n]
    ways: int
    shot: int
    queries: int

    @property
    def support_labels(self) -> np.ndarray:
        return np.repeat(np.arange(self.ways), self.shot)

    @property
    def query_labels(self) -> np.ndarray:
        return np.repeat(np.arange(self.ways), self.queries)


def sample_episodes(labels: np.ndarray, ways: int, shot: int, queries: int, num_episodes: int,
                    seed: int = 0) -> Episodes:
    """``num_episodes`` episodes over a bank with ``labels``: N = ``ways`` distinct classes, ``shot`` + ``queries``
    distinct images of each (support and query disjoint)."""
    classes = np.unique(labels)
    members = {c: np.flatnonzero(labels == c) for c in classes}
    smallest = min(len(m) for m in members.values())
    if ways > len(classes) or shot + queries > smallest or min(ways, shot, queries) < 1:
        raise ValueError(f"a {ways}-way {shot}-shot {queries}-query episode needs ways <= {len(classes)} classes and "
                         f"shot + queries <= {smallest} images per class (each >= 1)")
    rng = np.random.default_rng(seed)
    chosen = np.stack([rng.choice(classes, ways, replace=False) for _ in range(num_episodes)])
    draws = np.stack([np.stack([rng.choice(members[c], shot + queries, replace=False) for c in row]) for row in chosen])
    return Episodes(draws[:, :, :shot].reshape(num_episodes, -1), draws[:, :, shot:].reshape(num_episodes, -1),
                    chosen, ways, shot, queries)


def center_l2(features: torch.Tensor, base_mean: torch.Tensor) -> torch.Tensor:
    """CL2N: ``(x - base_mean) / ||x - base_mean||`` (the official ``metric_class_type(norm_type='CL2N')``)."""
    centred = features - base_mean
    return centred / centred.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def prototypes(support: torch.Tensor, ways: int) -> torch.Tensor:
    """Class means of class-major supports: ``(E, N*K, D) -> (E, N, D)``."""
    return support.reshape(support.shape[0], ways, -1, support.shape[-1]).mean(2)


def nearest_prototype(support: torch.Tensor, query: torch.Tensor, ways: int) -> torch.Tensor:
    """The inductive baseline (SimpleShot): each query gets the class of the nearest support mean (Euclidean)."""
    return torch.cdist(query, prototypes(support, ways)).argmin(-1)


def confidence_interval(accuracies: np.ndarray) -> tuple[float, float]:
    """Mean and 95 % half-width ``1.96 * std / sqrt(n)`` (population std, as the official
    ``compute_confidence_interval``)."""
    accuracies = np.asarray(accuracies, dtype=np.float64)
    return float(accuracies.mean()), float(1.96 * accuracies.std() / np.sqrt(len(accuracies)))


@torch.no_grad()
def extract_features(encoder: nn.Module, images: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...],
                     batch_size: int = 256, device: str = "cpu") -> np.ndarray:
    """``encoder.features`` (the penultimate layer, float32) of uint8 ``(N, H, W, C)`` images normalised with
    ``mean``/``std`` given in [0, 1], in image order; the encoder runs in eval mode."""
    encoder = encoder.eval().to(device)
    mean_255 = torch.tensor(mean).view(1, -1, 1, 1) * 255
    std_255 = torch.tensor(std).view(1, -1, 1, 1) * 255
    parts = []
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size])).permute(0, 3, 1, 2)
        parts.append(encoder.features(normalise_images(batch.to(device), mean_255, std_255)).float().cpu().numpy())
    return np.concatenate(parts)


def episode_accuracies(predict: Callable[[torch.Tensor, torch.Tensor, Episodes], torch.Tensor],
                       features: torch.Tensor, episodes: Episodes, chunk: int = 250) -> np.ndarray:
    """Per-episode query accuracy of ``predict(support (E, N*K, D), query (E, N*Q, D), episodes) -> (E, N*Q)``
    episode-local labels, in chunks of ``chunk`` episodes."""
    truth = torch.as_tensor(episodes.query_labels)
    out = []
    for start in range(0, len(episodes.support), chunk):
        part = slice(start, start + chunk)
        support = features[torch.as_tensor(episodes.support[part])]
        query = features[torch.as_tensor(episodes.query[part])]
        out.append((predict(support, query, episodes) == truth).double().mean(1).numpy())
    return np.concatenate(out)
