"""Transductive few-shot learning by regularised clustering (Ziko, Boudiaf, Dolz, Granger & Ben Ayed, 2021;
official code ``imtiazziko/SLK-few-shot``).

A task's support and query features X = [x_1..x_n] (CL2N, the queries shifted by mean(support) - mean(query)) are
clustered into its N classes, prototypes m_k starting at the support means, by minimising

    E(Y, m) = sum_i sum_k y_ik d(x_i, m_k)  -  lambda sum_ij w_ij y_i^T y_j,    y_i one-hot on its label for supports,

w_ij = 1 if x_j is one of the knn - 1 nearest neighbours of x_i. K-means: d = ||x - m||^2, m_k the cluster mean;
K-modes (SLK-MS): d = -exp(-||x - m||^2 / 2 sigma^2), m_k the kernel mode found by mean-shift, sigma^2 =
sum_ij w_ij ||x_i - x_j||^2 / 5n. The concave Laplacian term is linearised (a bound), giving independent softmax updates

    y_i <- softmax(-a_i + lambda sum_j w_ij y_j),    a_ik = d(x_i, m_k),

iterated to convergence of the bound's entropy energy, alternated with the prototype updates. lambda = 0 is plain
K-means / K-modes with hard assignments (the official ``lap_bound=False`` baselines). Every episode of a batch runs
its own iterations and stops by its own tests, as if alone.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from zoo.fewshot.episodes import prototypes
from zoo.fewshot.host import BaseClassifier

__all__ = ["SLK", "SLKBaseTraining", "bound_update", "bound_energy", "estimate_sigma", "knn_affinity",
           "laplacian_energy", "mean_shift", "squared_distances", "unary_potentials"]


def squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``||a_i - b_j||^2`` for batched ``(E, n, D)``, ``(E, m, D)`` by the expansion, clipped at 0 (as sklearn)."""
    return (a.pow(2).sum(-1)[..., :, None] + b.pow(2).sum(-1)[..., None, :] - 2 * a @ b.transpose(-1, -2)).clamp_min(0)


def knn_affinity(x: torch.Tensor, knn: int = 3) -> torch.Tensor:
    """W (E, n, n): ``w_ij = 1`` for the ``knn - 1`` nearest neighbours j of i, itself excluded (the official
    ``create_affinity``: ``knn`` neighbours counting the point itself, the first dropped; not symmetrised)."""
    nearest = squared_distances(x, x).topk(knn, dim=-1, largest=False).indices[..., 1:]
    return torch.zeros(x.shape[:-1] + x.shape[-2:-1], dtype=x.dtype).scatter_(-1, nearest, 1.0)


def estimate_sigma(x: torch.Tensor, affinity: torch.Tensor, normaliser: int = 5) -> torch.Tensor:
    """sigma (E,): ``sqrt(sum_ij w_ij ||x_i - x_j||^2 / (normaliser * n))``. The official ``SLK`` passes 5 whatever
    its kNN graph's degree (knn - 1 = 2 by default), so sigma^2 is 2/5 of the mean squared kNN distance."""
    return ((affinity * squared_distances(x, x)).sum((-1, -2)) / (normaliser * x.shape[-2])).sqrt()


def bound_energy(y: torch.Tensor, unary: torch.Tensor, affinity: torch.Tensor, lmd: float) -> torch.Tensor:
    """The bound's entropy energy (E,): ``sum y log y + y . a - lambda y . (W y)`` (official ``entropy_energy``)."""
    return (y * y.clamp_min(1e-20).log() + unary * y - lmd * (affinity @ y) * y).sum((-1, -2))


def unary_potentials(x: torch.Tensor, centres: torch.Tensor, sigma: torch.Tensor,
                     method: Literal["kmeans", "kmodes"]) -> torch.Tensor:
    """a_ik = d(x_i, m_k) (E, n, K): ``||x - m||^2`` (K-means) or ``-exp(-||x - m||^2 / 2 sigma^2)`` (K-modes)."""
    sq = squared_distances(x, centres)
    return sq if method == "kmeans" else -torch.exp(-sq / (2 * sigma[:, None, None] ** 2))


def laplacian_energy(unary: torch.Tensor, y: torch.Tensor, affinity: torch.Tensor, lmd: float) -> torch.Tensor:
    """E(Y, m) above (E,): ``sum y . a - lambda sum_k y_k^T W y_k``, the outer convergence test (official
    ``compute_energy_lapkmode_cont``)."""
    return (y * unary).sum((-1, -2)) - lmd * (y * (affinity @ y)).sum((-1, -2))


def bound_update(unary: torch.Tensor, y: torch.Tensor, affinity: torch.Tensor, lmd: float, iterations: int = 600,
                 tol: float = 1e-7, clamp: torch.Tensor | None = None) -> torch.Tensor:
    """Iterates ``y <- softmax(-unary + lmd W y)`` until the bound energy changes by at most ``tol`` (relative) from
    the previous iteration, after the third (official ``bound_update``). ``clamp`` (S,): the first S rows stay
    one-hot on these labels in every iteration (the paper's supervision constraint; the official code clamps them
    in the initial ``y`` only). Only the tasks still iterating are computed."""
    y = y.clone()
    previous = torch.full((y.shape[0],), float("inf"), dtype=y.dtype)
    running = torch.arange(y.shape[0])
    for i in range(iterations):
        a, w = unary[running], affinity[running]
        new = torch.softmax(-a + lmd * (w @ y[running]), dim=-1)
        if clamp is not None:
            new[:, : len(clamp)] = F.one_hot(clamp, y.shape[-1]).to(y.dtype)
        y[running] = new
        energy = bound_energy(new, a, w, lmd)
        converged = ((energy - previous[running]).abs() <= tol * previous[running].abs()) & (i > 1)
        previous[running] = energy
        running = running[~converged]
        if len(running) == 0:
            break
    return y


def mean_shift(x: torch.Tensor, labels: torch.Tensor, start: torch.Tensor, sigma: torch.Tensor, num_clusters: int,
               tol: float = 1e-5, iterations: int = 1000) -> torch.Tensor:
    """The kernel mode of each cluster (E, K, D): from ``start``, ``m <- sum_j g_j x_j / sum_j g_j`` over the
    cluster's points, ``g_j = exp(-||m - x_j||^2 / 2 sigma^2)``, until ``max|m' - m| < tol max|m|`` (official ``MS``).
    Only the (task, cluster) pairs still moving are computed."""
    members = F.one_hot(labels, num_clusters).transpose(-1, -2).to(x.dtype)  # (E, K, n)
    modes = start.clone()
    task = torch.arange(x.shape[0]).repeat_interleave(num_clusters)
    cluster = torch.arange(num_clusters).repeat(x.shape[0])
    for _ in range(iterations):
        mode, points = modes[task, cluster], x[task]  # (A, D), (A, n, D)
        weights = torch.exp(-squared_distances(mode[:, None], points)[:, 0] / (2 * sigma[task, None] ** 2))
        weights = weights * members[task, cluster]
        new = (weights[:, None] @ points)[:, 0] / weights.sum(-1, keepdim=True)
        modes[task, cluster] = new
        moving = (new - mode).abs().amax(-1) >= tol * mode.abs().amax(-1)
        task, cluster = task[moving], cluster[moving]
        if len(task) == 0:
            break
    return modes


class SLK(nn.Module):
    """SLK-Means (``method="kmeans"``) and SLK-MS (``"kmodes"``) on batched few-shot tasks; ``lmd=0`` gives plain
    K-means / K-modes.

    Args:
        method: the prototypes: cluster means (``kmeans``) or kernel modes by mean-shift (``kmodes``, official ``MS``).
        lmd: lambda, the Laplacian weight (official ``run_SLK.sh`` default 0.7, tuned on validation episodes over
            {0.05, 0.1, 0.3, 0.5, 0.7, 0.8, 0.9, 1.0}).
        knn: neighbours of the kNN affinity, the point itself included (official ``--knn 3``).
        clamp_support: keep the supports one-hot on their labels throughout (the paper's constraint); ``False`` is
            the official code, which fixes them only where each bound update and the first assignment start.
        shift_queries: add ``mean(support) - mean(query)`` to the queries first (official ``metric_class_type``).
        outer_iterations, bound_iterations, outer_tol, bound_tol: official 100, 600, 1e-4, 1e-7.
    """

    def __init__(self, method: Literal["kmeans", "kmodes"] = "kmodes", lmd: float = 0.7, knn: int = 3,
                 clamp_support: bool = True, shift_queries: bool = True, outer_iterations: int = 100,
                 bound_iterations: int = 600, outer_tol: float = 1e-4, bound_tol: float = 1e-7):
        super().__init__()
        if method not in ("kmeans", "kmodes"):
            raise ValueError(f"method={method!r}; use 'kmeans' or 'kmodes'")
        if lmd < 0 or knn < 2:
            raise ValueError(f"lmd={lmd} must be >= 0 and knn={knn} >= 2 (the point itself and one neighbour)")
        self.method, self.lmd, self.knn, self.clamp_support = method, lmd, knn, clamp_support
        self.shift_queries, self.outer_iterations, self.outer_tol = shift_queries, outer_iterations, outer_tol
        self.bound_iterations, self.bound_tol = bound_iterations, bound_tol

    def forward(self, support: torch.Tensor, query: torch.Tensor, ways: int) -> torch.Tensor:
        """Query labels (E, Q) of class-major ``support`` (E, N*K, D) and ``query`` (E, Q, D) features (CL2N)."""
        support, query = support.double(), query.double()
        if self.shift_queries:
            query = query + (support.mean(1, keepdim=True) - query.mean(1, keepdim=True))
        support_labels = torch.arange(ways).repeat_interleave(support.shape[1] // ways)
        x = torch.cat([support, query], 1)
        affinity = knn_affinity(x, self.knn)
        return self.cluster(x, affinity, prototypes(support, ways), support_labels)[:, len(support_labels):]

    def cluster(self, x: torch.Tensor, affinity: torch.Tensor, centres: torch.Tensor,
                support_labels: torch.Tensor) -> torch.Tensor:
        """Labels (E, n) of every point of ``x``, the first ``len(support_labels)`` being the supports (official
        ``SLK``)."""
        num_clusters, num_support = centres.shape[1], len(support_labels)
        sigma = estimate_sigma(x, affinity)
        labels = squared_distances(x, centres).argmin(-1)
        labels[:, :num_support] = support_labels
        centres = centres.clone()
        previous = torch.full((x.shape[0],), float("inf"), dtype=x.dtype)
        running = torch.arange(x.shape[0])
        clamp = support_labels if self.clamp_support else None
        for i in range(self.outer_iterations):
            xs, graph, sig = x[running], affinity[running], sigma[running]
            if self.method == "kmodes":
                new_centres = mean_shift(xs, labels[running], centres[running], sig, num_clusters)
            else:
                onehot = F.one_hot(labels[running], num_clusters).to(x.dtype)
                new_centres = onehot.transpose(-1, -2) @ xs / onehot.sum(1)[..., None]
            unary = unary_potentials(xs, new_centres, sig, self.method)
            if self.lmd > 0:
                start = torch.softmax(-unary, -1)
                start[:, :num_support] = F.one_hot(support_labels, num_clusters).to(x.dtype)
                y = bound_update(unary, start, graph, self.lmd, self.bound_iterations, self.bound_tol, clamp)
                new_labels = y.argmax(-1)
            else:
                new_labels = unary.argmin(-1)
                if clamp is not None:
                    new_labels[:, :num_support] = clamp
                y = F.one_hot(new_labels, num_clusters).to(x.dtype)
            # a cluster emptied: the official code keeps the previous labels and prototypes and stops this task
            kept = F.one_hot(new_labels, num_clusters).amax(1).sum(-1) == num_clusters
            centres[running[kept]], labels[running[kept]] = new_centres[kept], new_labels[kept]
            energy = laplacian_energy(unary, y, graph, self.lmd)
            converged = (energy - previous[running]).abs() <= self.outer_tol * previous[running].abs()
            converged &= i > 1
            previous[running] = energy
            running = running[kept & ~converged]
            if len(running) == 0:
                break
        return labels


class SLKBaseTraining(BaseClassifier):
    """The base encoder of the paper: plain cross-entropy on the base classes (no episodes, no meta-learning).

    Defaults are the official ``train_SLK.py`` / ``configs/mini/softmax/*.config``: SGD momentum 0.9 (not Nesterov),
    lr 0.1, weight decay 1e-4 on every parameter, lr x0.1 at 50 % and 75 % of training (``multi_step``), label
    smoothing 0.1, no EMA.
    """

    def __init__(self, network: nn.Module, label_smoothing: float = 0.1, optimizer: str = "sgd", lr: float = 0.1,
                 weight_decay: float = 1e-4, nesterov: bool = False, lr_schedule: str = "step",
                 decay_norm_and_bias: bool = True, ema_decay: float | None = None, **base):
        super().__init__(network, label_smoothing=label_smoothing, optimizer=optimizer, lr=lr,
                         weight_decay=weight_decay, nesterov=nesterov, lr_schedule=lr_schedule,
                         decay_norm_and_bias=decay_norm_and_bias, ema_decay=ema_decay, **base)
