"""InterCLR (Xie, Zhan, Liu, Ong & Loy, *Delving into Inter-Image Invariance for Unsupervised Visual
Representations*, IJCV 2022), on MoCo-v2. Official code: open-mmlab/mmselfsup 0.x,
``mmselfsup/models/algorithms/interclr_moco.py`` (the two branches), ``mmselfsup/models/memories/interclr_memory.py``
(the memory bank and its online labels), ``mmselfsup/core/hooks/interclr_hook.py`` (the initial clustering and the
per-iteration centroid / small-cluster upkeep), ``configs/selfsup/_base_/models/interclr-moco.py`` (the numbers).

One training step (the official ``forward_train`` and ``after_train_iter``, in that order):

1. queries ``q = neck(encoder(view1))``; keys ``k = key_encoder(view2)``, the momentum copy of encoder + neck;
2. intra-image branch, MoCo-v2: InfoNCE of ``q`` against ``[k | queue]`` at temperature 0.2;
3. inter-image branch, on the memory bank (one normalised 128-d key per training image, with a cluster label):
   the positive is a random bank entry with the same label as the image's own entry; the negatives are drawn
   uniformly from the ``semihard_pool`` bank entries most similar to ``q``, any of the anchor's label re-drawn; the
   positive logit gets the cosine margin, ``cos - m`` with ``m = -0.5`` (a relaxed boundary); same head, same T;
4. loss ``0.75 intra + 0.25 inter``;
5. the keys of the global batch enter the queue and overwrite their images' bank entries (bank momentum 1), and
   each written image takes the label of its nearest centroid (the *online* labels);
6. every ``centroid_update_interval`` steps all centroids become their members' mean; every
   ``small_cluster_interval`` steps clusters under ``min_cluster_size`` are emptied into their nearest other
   centroids and refilled by splitting the largest cluster in two (2-means).

Before the first step the bank is filled from the untrained encoder + neck over the un-augmented train split and
clustered by k-means (the hook's ``deepcluster`` + ``init_memory``). With ``inter_weight=0`` the bank is never built
and the module is MoCo-v2 (the baseline, ``experiments/interclr_cifar10_subset_moco.yaml``).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from sklearn.cluster import KMeans

from zoo.core.data import ViewDataset
from zoo.core.datasets import evaluation_images
from zoo.core.distributed import concat_all_gather, is_distributed
from zoo.core.teacher import EMATeacher
from zoo.core.views import Identity
from zoo.ssl.encoders import MLPHead
from zoo.ssl.evaluation import FeatureStore
from zoo.ssl.hosts import SSLModule

__all__ = ["InterCLR", "contrastive_loss", "intra_image_logits", "inter_image_logits", "sample_positives",
           "sample_semihard_negatives", "kmeans", "cluster_means", "nearest_centroid", "reassign_small_clusters"]


# ------------------------------------------------------------------------------------------------- losses
def contrastive_loss(positive_logits: torch.Tensor, negative_logits: torch.Tensor,
                     temperature: float) -> torch.Tensor:
    """The official ``ContrastiveHead``: cross-entropy of ``[positive | negatives] / T`` with the positive as class 0,
    averaged over anchors. ``positive_logits`` is (B, 1), ``negative_logits`` (B, K); a ``-inf`` negative is
    absent. Computed in float32 outside autocast (logits ``cos / 0.2`` in bf16 keep ~3 significant digits)."""
    with torch.autocast(device_type=positive_logits.device.type, enabled=False):
        logits = torch.cat([positive_logits.float(), negative_logits.float()], dim=1) / temperature
        return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device))


def intra_image_logits(queries: torch.Tensor, keys: torch.Tensor,
                       queue: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MoCo's logits (``contrast_intra``): ``cos(q, k)`` (B, 1) and ``cos(q, queue)`` (B, K); ``queue`` is (K, D) of
    normalised keys, ``keys`` carry no gradient. The queue is copied (the official ``queue.clone().detach()``): the
    step enqueues into it in place before the backward pass, which needs the values the logits were computed with."""
    q, k = F.normalize(queries.float(), dim=1), F.normalize(keys.detach().float(), dim=1)
    return (q * k).sum(dim=1, keepdim=True), q @ queue.detach().clone().float().T


def inter_image_logits(queries: torch.Tensor, bank: torch.Tensor, positives: torch.Tensor,
                       negatives: torch.Tensor, valid_negatives: torch.Tensor,
                       margin: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The inter-image logits (``contrast_inter``): ``cos(q, bank[positive]) - margin`` (B, 1) and
    ``cos(q, bank[negatives])`` (B, K), invalid negatives at ``-inf``. ``bank`` rows are normalised; no gradient
    reaches them. ``margin < 0`` *raises* the positive logit (the paper's relaxed boundary, m = -0.5)."""
    q = F.normalize(queries.float(), dim=1)
    bank = bank.detach().float()
    positive = (bank[positives] * q).sum(dim=1, keepdim=True) - margin
    negative = torch.einsum("bkd,bd->bk", bank[negatives], q).masked_fill(~valid_negatives, float("-inf"))
    return positive, negative


# ----------------------------------------------------------------------------------------------- sampling
def sample_positives(bank_labels: torch.Tensor, anchor_labels: torch.Tensor) -> torch.Tensor:
    """For each anchor, a uniformly random bank index whose label is the anchor's (the anchor's own entry
    included, as the official ``torch.where(label_bank == l)`` pool). Vectorised: bank indices sorted by label,
    then a uniform offset into the anchor's label's run."""
    order = torch.argsort(bank_labels, stable=True)
    counts = torch.bincount(bank_labels, minlength=int(anchor_labels.max()) + 1)
    starts = torch.cumsum(counts, 0) - counts
    size = counts[anchor_labels]
    if (size == 0).any():
        raise ValueError("an anchor's label has no bank entry")
    offset = (torch.rand(len(anchor_labels), device=bank_labels.device) * size).long().clamp_max(size - 1)
    return order[starts[anchor_labels] + offset]


def sample_semihard_negatives(similarity: torch.Tensor, bank_labels: torch.Tensor, anchor_labels: torch.Tensor,
                              pool_size: int, num_negatives: int,
                              max_redraws: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """Semi-hard negatives (``neg_sampling='semihard'``): per anchor, the pool of its ``pool_size`` most similar
    bank entries (``similarity``: (B, N) cosines of the detached query to the bank); ``num_negatives`` drawn from
    the pool uniformly without replacement; every drawn entry sharing the anchor's label is re-drawn (from a fresh
    draw of the pool, as the official loop) until none does.

    Returns the (B, K) bank indices and a mask of valid ones: the official loop never ends when a pool holds no
    other label; here after ``max_redraws`` rounds the remaining same-label draws are masked out instead."""
    pool = similarity.topk(min(pool_size, similarity.shape[1]), dim=1).indices
    if num_negatives > pool.shape[1]:
        raise ValueError(f"num_negatives={num_negatives} exceeds the semi-hard pool of {pool.shape[1]}")
    weights = torch.ones(pool.shape, device=similarity.device)

    def draw() -> torch.Tensor:
        return pool.gather(1, torch.multinomial(weights, num_negatives))

    negatives = draw()
    for _ in range(max_redraws):
        same_label = bank_labels[negatives] == anchor_labels[:, None]
        if not same_label.any():
            break
        negatives = torch.where(same_label, draw(), negatives)
    return negatives, bank_labels[negatives] != anchor_labels[:, None]


# -------------------------------------------------------------------------------------------- clustering
def cluster_means(features: torch.Tensor, labels: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """Each cluster's mean feature (not re-normalised, as ``_compute_centroids``); an empty cluster keeps its
    ``previous`` centroid."""
    sums = torch.zeros_like(previous).index_add_(0, labels, features.to(previous.dtype))
    counts = torch.bincount(labels, minlength=len(previous)).to(previous.dtype)[:, None]
    return torch.where(counts > 0, sums / counts.clamp_min(1), previous)


def nearest_centroid(features: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """The online label rule: argmax of the dot product with the (un-normalised) centroids."""
    return (features.float() @ centroids.float().T).argmax(dim=1)


@torch.no_grad()
def kmeans(features: torch.Tensor, num_clusters: int, iterations: int = 20, seed: int = 0,
           chunk: int = 65536) -> torch.Tensor:
    """Lloyd's k-means on L2-normalised features (squared Euclidean distance), ``iterations`` rounds from
    ``num_clusters`` distinct random points (faiss ``Clustering``, the official clustering, does the same: 20
    iterations, random init); an emptied cluster restarts at a random member of the largest one (faiss splits the
    largest). Returns the labels."""
    x = F.normalize(features.float(), dim=1)
    if num_clusters > len(x):
        raise ValueError(f"{num_clusters} clusters for {len(x)} features")
    generator = torch.Generator().manual_seed(seed)
    centroids = x[torch.randperm(len(x), generator=generator)[:num_clusters].to(x.device)].clone()

    def assign(c: torch.Tensor) -> torch.Tensor:
        half_norms = 0.5 * (c * c).sum(dim=1)  # argmin |x - c|^2 = argmax (x.c - |c|^2 / 2)
        return torch.cat([(part @ c.T - half_norms).argmax(dim=1) for part in x.split(chunk)])

    for _ in range(iterations):
        labels = assign(centroids)
        centroids = cluster_means(x, labels, centroids)
        counts = torch.bincount(labels, minlength=num_clusters)
        for empty in torch.nonzero(counts == 0).flatten().tolist():
            members = torch.nonzero(labels == counts.argmax()).flatten()
            pick = members[torch.randint(len(members), (1,), generator=generator).to(members.device)]
            centroids[empty] = x[pick]
            labels[pick] = empty
            counts = torch.bincount(labels, minlength=num_clusters)
    return assign(centroids)


@torch.no_grad()
def reassign_small_clusters(features: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor,
                            min_cluster_size: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``deal_with_small_clusters``: the members of every cluster under ``min_cluster_size`` move to their nearest
    centroid among the other clusters; then each emptied cluster takes the second half of the (current) largest
    cluster split by 2-means (``_redirect_empty_clusters``: scikit-learn ``KMeans(2, random_state=0,
    max_iter=20)``, as the official code), and both clusters' centroids are recomputed.

    Returns the new labels, the new centroids and the number of small clusters."""
    labels, centroids = labels.clone(), centroids.clone()
    num_clusters = len(centroids)
    small = torch.nonzero(torch.bincount(labels, minlength=num_clusters) < min_cluster_size).flatten()
    if len(small) == 0:
        return labels, centroids, 0
    kept = torch.ones(num_clusters, dtype=torch.bool, device=labels.device)
    kept[small] = False
    kept = torch.nonzero(kept).flatten()
    moving = torch.isin(labels, small)
    labels[moving] = kept[nearest_centroid(features[moving], centroids[kept])]
    for empty in small.tolist():
        largest = int(torch.bincount(labels, minlength=num_clusters).argmax())
        members = torch.nonzero(labels == largest).flatten()
        halves = KMeans(n_clusters=2, random_state=0, max_iter=20, n_init=10).fit(
            features[members].float().cpu().numpy()).labels_
        second = torch.from_numpy(halves == 1).to(members.device)
        if second.all() or not second.any():  # degenerate split: a random half, as the official fallback
            second = torch.zeros_like(second)
            second[torch.randperm(len(members), device=members.device)[len(members) // 2:]] = True
        labels[members[second]] = empty
        for c in (largest, empty):
            centroids[c] = features[labels == c].float().mean(dim=0)
    return labels, centroids, len(small)


# ------------------------------------------------------------------------------------------------- module
class InterCLR(SSLModule):
    """MoCo-v2 with InterCLR's inter-image branch (module docstring). Defaults: the official
    ``configs/selfsup/_base_/models/interclr-moco.py`` and the hook settings of
    ``configs/selfsup/_base_/datasets/imagenet_interclr-moco.py`` (ImageNet, ResNet-50).

    Args:
        intra_weight, inter_weight: 0.75, 0.25. ``inter_weight=0`` (with ``intra_weight=1``) is MoCo-v2.
        temperature: 0.2, both branches (``ContrastiveHead``).
        queue_length: 65,536 keys (MoCo).
        key_momentum: 0.999, the key encoder's EMA decay (constant).
        neck_hidden_dim, feature_dim: MoCo-v2's neck, Linear-ReLU-Linear, 2048 -> 128 (``None``: the encoder's
            width as hidden width, 2048 for ResNet-50).
        num_clusters, min_cluster_size: 10,000 and 20 (ImageNet).
        num_negatives, semihard_pool: 16,384 inter-image negatives drawn from the 128,000 most similar entries.
        inter_margin: -0.5, the cosine margin ``m`` of ``cos - m`` on the inter-image positive.
        centroid_update_interval, small_cluster_interval: 10 and 1 steps (the hook's intervals).
        kmeans_iterations, cluster_seed: the initial k-means (20 iterations, as the official faiss call) and its seed.
        lr, weight_decay: 0.03 and 1e-4 (``sgd_coslr-200e_in1k``, momentum 0.9, cosine to 0; host defaults
            changed). Other arguments: ``zoo.ssl.hosts.SSLModule``.
    """

    view_names = ("view1", "view2")
    expected_metrics = SSLModule.expected_metrics + ("train/intra_loss",)

    def __init__(self, network: nn.Module, intra_weight: float = 0.75, inter_weight: float = 0.25,
                 temperature: float = 0.2, queue_length: int = 65536, key_momentum: float = 0.999,
                 neck_hidden_dim: int | None = None, feature_dim: int = 128, num_clusters: int = 10000,
                 min_cluster_size: int = 20, num_negatives: int = 16384, semihard_pool: int = 128000,
                 inter_margin: float = -0.5, centroid_update_interval: int = 10, small_cluster_interval: int = 1,
                 kmeans_iterations: int = 20, cluster_seed: int = 0, lr: float = 0.03, weight_decay: float = 1e-4,
                 **host):
        super().__init__(network, lr=lr, weight_decay=weight_decay, **host)
        self.intra_weight, self.inter_weight, self.temperature = intra_weight, inter_weight, temperature
        self.key_momentum, self.num_clusters, self.min_cluster_size = key_momentum, num_clusters, min_cluster_size
        self.num_negatives, self.semihard_pool, self.inter_margin = num_negatives, semihard_pool, inter_margin
        self.centroid_update_interval, self.small_cluster_interval = centroid_update_interval, small_cluster_interval
        self.kmeans_iterations, self.cluster_seed = kmeans_iterations, cluster_seed
        # MoCo-v2's neck (mmselfsup MoCoV2Neck): Linear -> ReLU -> Linear, with biases, no BatchNorm
        self.neck = MLPHead(self.num_features, neck_hidden_dim or self.num_features, feature_dim, batch_norm=False)
        self.key_encoder = EMATeacher(self.query_encoder(), buffers="copy", train_mode=True)
        # buffers: in every checkpoint, so a resumed run continues with the same queue, bank and clusters
        self.register_buffer("queue", F.normalize(torch.randn(queue_length, feature_dim), dim=1))
        self.register_buffer("queue_pointer", torch.zeros((), dtype=torch.long))
        self.register_buffer("bank", torch.zeros(0, feature_dim))  # sized to the train split in setup()
        self.register_buffer("bank_labels", torch.zeros(0, dtype=torch.long))
        self.register_buffer("centroids", torch.zeros(num_clusters if inter_weight > 0 else 0, feature_dim))
        self.register_buffer("bank_ready", torch.zeros((), dtype=torch.bool))

    @property
    def uses_bank(self) -> bool:
        return self.inter_weight > 0

    def query_encoder(self) -> nn.Module:
        """Encoder + neck, the network the key encoder averages (built on the fly: not a second registration)."""
        return nn.Sequential(self.network, self.neck)

    def embedding(self, features: torch.Tensor) -> torch.Tensor:
        return self.neck(features)

    # ------------------------------------------------------------------ the memory bank's first filling
    def setup(self, stage: str) -> None:
        super().setup(stage)
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if not self.uses_bank or datamodule is None:
            return
        size = len(datamodule.data.x_train)
        if len(self.bank) != size:  # one entry per training image (before a checkpoint is restored into it)
            self.bank = torch.zeros(size, self.bank.shape[1], device=self.bank.device)
            self.bank_labels = torch.zeros(size, dtype=torch.long, device=self.bank.device)
        if self.num_clusters * self.min_cluster_size > size:
            raise ValueError(f"{self.num_clusters} clusters of at least {self.min_cluster_size} cannot hold the "
                             f"{size} images of {datamodule.dataset}: scale num_clusters / min_cluster_size")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """A checkpoint's bank has one entry per training image; a module built outside a Trainer (the offline
        feature-bank tools) has not sized it yet: take the checkpoint's size."""
        for name in ("bank", "bank_labels"):
            saved = state_dict.get(prefix + name)
            if saved is not None and saved.shape != getattr(self, name).shape:
                setattr(self, name, torch.zeros_like(saved, device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def on_train_start(self) -> None:
        if self.uses_bank and not self.bank_ready:  # a resumed run restored its bank from the checkpoint
            self.fill_bank(self.trainer.datamodule)

    @torch.no_grad()
    def fill_bank(self, datamodule) -> None:
        """The hook's ``deepcluster`` + ``init_memory``: encoder + neck in eval mode over the un-augmented train
        split (each rank a shard, gathered), k-means on the normalised features, centroids = cluster means."""
        was_training = self.training
        self.eval()
        images = evaluation_images(datamodule.data.x_train)  # a lazily decoded folder: fixed-size centre crops
        loader = datamodule.eval_loader(ViewDataset(images, datamodule.data.y_train, {"image": Identity()}),
                                        datamodule.eval_batch_size)
        store = FeatureStore()
        for batch in loader:
            batch = datamodule.on_after_batch_transfer(self.transfer_batch_to_device(batch, self.device, 0), 0)
            store.add(batch["idx"], batch["label"], feature=self.embedding(self.network(batch["image"])))
        self.train(was_training)
        features = F.normalize(store.gathered()["feature"], dim=1)
        labels = kmeans(features, self.num_clusters, self.kmeans_iterations, self.cluster_seed)
        if is_distributed():  # every rank clustered the same features; rank 0's result is the one kept
            dist.broadcast(labels, 0)
        self.bank.copy_(features)
        self.bank_labels.copy_(labels)
        self.centroids.copy_(cluster_means(features, labels, self.centroids))
        self.bank_ready.fill_(True)

    # -------------------------------------------------------------------------------- training
    def ssl_step(self, batch: dict):
        features = self.network(batch["view1"])
        queries = self.embedding(features)
        with torch.no_grad():
            keys = F.normalize(self.key_encoder(batch["view2"]).float(), dim=1)

        with torch.autocast(device_type=queries.device.type, enabled=False):
            intra_loss = contrastive_loss(*intra_image_logits(queries, keys, self.queue), self.temperature)
            loss, logs = self.intra_weight * intra_loss, {"intra_loss": intra_loss.detach()}
            if self.uses_bank:
                inter_loss = self.inter_image_loss(queries, batch["idx"])
                loss = loss + self.inter_weight * inter_loss
                logs["inter_loss"] = inter_loss.detach()

        all_keys = concat_all_gather(keys)  # the global batch's keys, on every rank
        self.enqueue(all_keys)
        if self.uses_bank:
            logs.update(self.update_bank(concat_all_gather(batch["idx"]), all_keys))
        return loss, [features], logs

    def inter_image_loss(self, queries: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        anchor_labels = self.bank_labels[idx]
        positives = sample_positives(self.bank_labels, anchor_labels)
        similarity = F.normalize(queries.detach().float(), dim=1) @ self.bank.T
        negatives, valid = sample_semihard_negatives(similarity, self.bank_labels, anchor_labels,
                                                     self.semihard_pool, self.num_negatives)
        return contrastive_loss(*inter_image_logits(queries, self.bank, positives, negatives, valid,
                                                    self.inter_margin), self.temperature)

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """The oldest ``len(keys)`` queue entries are replaced by ``keys`` (the official ``_dequeue_and_enqueue``;
        wrapping around the end where the queue length is not a multiple of the batch)."""
        slots = (self.queue_pointer + torch.arange(len(keys), device=keys.device)) % len(self.queue)
        self.queue[slots] = keys.to(self.queue.dtype)
        self.queue_pointer.copy_((self.queue_pointer + len(keys)) % len(self.queue))

    @torch.no_grad()
    def update_bank(self, idx: torch.Tensor, keys: torch.Tensor) -> dict[str, torch.Tensor]:
        """``update_samples_memory`` (bank momentum 1: the new key replaces the entry), the online label of each
        written image (its nearest centroid), then the hook's ``after_train_iter`` upkeep."""
        self.bank[idx] = keys.to(self.bank.dtype)
        new_labels = nearest_centroid(keys, self.centroids)
        logs = {"label_change_ratio": (new_labels != self.bank_labels[idx]).float().mean()}
        self.bank_labels[idx] = new_labels
        step = self.global_step + 1  # mmcv's every_n_iters: (iter + 1) % n == 0
        if step % self.centroid_update_interval == 0:
            self.centroids.copy_(cluster_means(self.bank, self.bank_labels, self.centroids))
        if step % self.small_cluster_interval == 0:
            labels, centroids, small = reassign_small_clusters(self.bank, self.bank_labels, self.centroids,
                                                               self.min_cluster_size)
            self.bank_labels.copy_(labels)
            self.centroids.copy_(centroids)
            logs["small_clusters"] = torch.tensor(float(small))
        return logs

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        # MoCo updates the key encoder at the start of the next forward; right after this step is the same
        self.key_encoder.update(self.query_encoder(), self.key_momentum)
