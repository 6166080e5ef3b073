"""The object graph of Wang, He & Gupta (ICCV 2017) mined from video, and the stream of positive pairs it gives.

The paper mines millions of moving-object patches from ~100k YouTube videos; here the offline stand-in is DAVIS-2016
(9 real sequences, 432 consecutive 24 fps frames, every frame with its object mask; ``$ZOO_DATA_DIR/davis2016``):

==========================================  =====================================================================
paper (Sec. 3)                              here
==========================================  =====================================================================
node: a patch of a moving object found by   the box of the frame's DAVIS object mask (:func:`mask_box`), cut from
motion (IDT) and tracked (KCF)              the frame and resized to ``patch_size`` (:func:`davis_patches`)
intra-instance edge <A, A'>: the patch and  the patch of frame t and the patch of frame t + ``track_gap`` of the
the same object tracked N frames later      same sequence; every frame t that has such a partner starts one
                                            instance, so a sequence gives ``frames - track_gap`` instances
inter-instance edge <A, B>: neighbours in   the ``inter_neighbors`` nearest instances (cosine similarity of the A
the feature space of a context-prediction   patches' features) within the same k-means cluster (``num_clusters``),
net, after clustering                       from *other* sequences: one object per DAVIS sequence, so another
                                            sequence is another instance. Features: a frozen encoder the zoo
                                            builds (``mining_encoder``, random init from ``mining_seed`` or the
                                            ``network`` weights of a zoo checkpoint ``mining_weights``)
transitivity: <A,B'>, <A',B>, <A',B'>       :func:`transitive_pairs`
==========================================  =====================================================================

Training stream (the zoo's data contract: global ``batch_size`` pairs, sharded, fixed length, exact resume): each
item is one positive pair ``{"anchor", "positive"}`` (uint8 CHW: the official data layer's random ``crop_size`` crop
of the resized patch and a mirror flip, :class:`PatchCrop`), ``"video"`` (the anchor's sequence: the official loss
never takes a negative with the anchor's label, "the same video"), plus one image of the evaluation set's labeled
train split with its ``"label"``, un-augmented, for the host's online linear probe (the transfer accuracy
``val/linear_acc``). Pairs are drawn uniformly from the pair list: ``edges="transitive"`` serves the intra-instance
pairs, the inter-instance pairs and the transitive pairs; ``edges="intra"`` only the intra-instance ones (the paper's
ablation). The graph is mined once in ``setup``, deterministically from ``mining_seed``; nothing is cached on disk.

Evaluation loaders: :class:`zoo.ssl.data.SSLDataModule`'s bank / test splits of ``dataset`` (transfer kNN and probe).
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from zoo.core.datasets import MissingDatasetError, data_root, shared_root
from zoo.core.views import View
from zoo.ssl.data import SSLDataModule
from zoo.ssl.encoders import timm_encoder
from zoo.ssl.views import MultiView

__all__ = ["mask_box", "davis_root", "davis_patches", "intra_instance_edges", "inter_instance_edges",
           "transitive_pairs", "PatchCrop", "PairDataset", "TransitiveGraphDataModule"]


# ------------------------------------------------------------------------------------------------ DAVIS patches
def mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(top, left, bottom, right), bottom/right exclusive: the tightest box around the mask's non-zero pixels."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not len(rows):
        raise ValueError("the mask is empty: no object box")
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def davis_root() -> Path:
    for root in (data_root(), shared_root()):
        if (root / "davis2016" / "val_subset.txt").exists():
            return root / "davis2016"
    raise MissingDatasetError(f"DAVIS-2016 not found: {(data_root() / 'davis2016').resolve()}\n  It ships in the zoo's "
                              f"shared offline data (set ZOO_DATA_DIR=../shared/data); the layout is DAVIS's "
                              f"(JPEGImages/<res>/<seq>/*.jpg, Annotations/<res>/<seq>/*.png, val_subset.txt)")


def davis_patches(root: Path, patch_size: int, sequences: list[str] | None = None):
    """Every frame's object patch: (patches (N, patch_size, patch_size, 3) uint8, video (N,), frame (N,), boxes (N, 4)).

    The box of the mask is resized to a square, as the official data layer resizes every patch to 227 x 227."""
    names = sequences or (root / "val_subset.txt").read_text().split()
    patches, video, frame, boxes = [], [], [], []
    resolution = next((root / "JPEGImages").iterdir()).name  # the one resolution folder (240p)
    for v, name in enumerate(names):
        for t, path in enumerate(sorted((root / "JPEGImages" / resolution / name).glob("*.jpg"))):
            mask = np.array(Image.open(root / "Annotations" / resolution / name / f"{path.stem}.png"))
            top, left, bottom, right = mask_box(mask)
            image = Image.open(path).convert("RGB")
            patches.append(np.asarray(image.resize((patch_size, patch_size), Image.BILINEAR,
                                                   box=(left, top, right, bottom))))
            video.append(v), frame.append(t), boxes.append((top, left, bottom, right))
    return np.stack(patches), np.array(video), np.array(frame), np.array(boxes)


# ----------------------------------------------------------------------------------------------- the graph
def intra_instance_edges(video: np.ndarray, frame: np.ndarray, track_gap: int) -> np.ndarray:
    """(I, 2) node pairs <A, A'>: each node and the node of the same video ``track_gap`` frames later (the object
    "tracked" that far), one instance per node that has such a partner."""
    where = {(int(v), int(t)): i for i, (v, t) in enumerate(zip(video, frame))}
    edges = [(i, where[(int(v), int(t) + track_gap)]) for i, (v, t) in enumerate(zip(video, frame))
             if (int(v), int(t) + track_gap) in where]
    return np.array(edges, dtype=np.int64).reshape(-1, 2)


def _kmeans(x: np.ndarray, k: int, rng: np.random.Generator, iterations: int = 50) -> np.ndarray:
    """Lloyd's k-means on the unit sphere (cosine), k-means++ seeding: the cluster of each row."""
    centres = [x[rng.integers(len(x))]]
    for _ in range(1, k):
        distance = np.min([1 - x @ c for c in centres], axis=0).clip(min=0)
        centres.append(x[rng.choice(len(x), p=distance / distance.sum())] if distance.sum() > 0 else
                       x[rng.integers(len(x))])
    centres = np.stack(centres)
    for _ in range(iterations):
        assign = (x @ centres.T).argmax(axis=1)
        for c in range(k):
            if (assign == c).any():
                centre = x[assign == c].sum(axis=0)
                centres[c] = centre / max(np.linalg.norm(centre), 1e-12)
    return (x @ centres.T).argmax(axis=1)


def inter_instance_edges(features: np.ndarray, video: np.ndarray, num_clusters: int, neighbors: int,
                         seed: int = 0) -> np.ndarray:
    """(E, 2) instance pairs <p, q>, p < q: within each k-means cluster of the (L2-normalised) ``features``, each
    instance and its ``neighbors`` most similar instances of *other* videos (cosine similarity). Undirected,
    each edge once."""
    x = features / np.linalg.norm(features, axis=1, keepdims=True).clip(min=1e-12)
    cluster = _kmeans(x, min(num_clusters, len(x)), np.random.default_rng(seed))
    similarity = x @ x.T
    allowed = (cluster[:, None] == cluster[None, :]) & (video[:, None] != video[None, :])
    similarity = np.where(allowed, similarity, -np.inf)
    edges = set()
    for p in range(len(x)):
        order = np.argsort(-similarity[p], kind="stable")[:neighbors]
        edges.update((min(p, int(q)), max(p, int(q))) for q in order if np.isfinite(similarity[p, q]))
    return np.array(sorted(edges), dtype=np.int64).reshape(-1, 2)


def transitive_pairs(instances: np.ndarray, inter_edges: np.ndarray) -> np.ndarray:
    """(4E, 2) node pairs from the inter-instance edges: for each <p, q> with intra-instance edges <A, A'> of p and
    <B, B'> of q, the inter-instance pair <A, B> and the transitive ones <A, B'>, <A', B>, <A', B'> (paper Fig. 3)."""
    a, a_tracked = instances[inter_edges[:, 0]].T
    b, b_tracked = instances[inter_edges[:, 1]].T
    pairs = [(a, b), (a, b_tracked), (a_tracked, b), (a_tracked, b_tracked)]
    return np.stack([np.stack(p, axis=1) for p in pairs], axis=1).reshape(-1, 2)


# ------------------------------------------------------------------------------------------------ the stream
class PatchCrop(View):
    """The official data layer's augmentation: a random ``size`` crop of the resized patch (224 of 227) and a
    horizontal mirror with probability 1/2 (``transform_param {mirror: true crop_size: 224}``)."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, image: np.ndarray, rng: random.Random) -> np.ndarray:
        h, w = image.shape[:2]
        top, left = rng.randint(0, h - self.size), rng.randint(0, w - self.size)
        crop = image[top : top + self.size, left : left + self.size]
        return crop[:, ::-1] if rng.random() < 0.5 else crop


class PairDataset(Dataset):
    """Item ``(index, seed)``: positive pair ``index`` as two crops, its anchor's video, and one probe image (the
    evaluation set's labeled train split, drawn by the item's seed) with its label."""

    def __init__(self, patches: np.ndarray, video: np.ndarray, pairs: np.ndarray, crop: View,
                 probe_images: np.ndarray, probe_labels: np.ndarray):
        self.patches, self.video, self.pairs, self.crop = patches, video, pairs, crop
        self.probe_images, self.probe_labels = probe_images, probe_labels

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, key) -> dict:
        index, seed = key if isinstance(key, tuple) else (key, key)
        rng = random.Random(seed)
        anchor, positive = self.pairs[index]
        probe = rng.randrange(len(self.probe_labels))

        def tensor(image):
            return torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1)

        return {"idx": index, "anchor": tensor(self.crop(self.patches[anchor], rng)),
                "positive": tensor(self.crop(self.patches[positive], rng)), "video": int(self.video[anchor]),
                "image": tensor(self.probe_images[probe]), "label": int(self.probe_labels[probe])}


class TransitiveGraphDataModule(SSLDataModule):
    """Graph-mined positive pairs of DAVIS object patches for training; ``dataset``'s bank / test splits for
    evaluation (see the module docstring).

    Args:
        dataset: the evaluation image set (``zoo.core.datasets.IMAGE_SETS``); the probe images come from its train split.
        edges: ``"transitive"`` (intra + inter + transitive pairs, the paper's method) or ``"intra"`` (the ablation).
        patch_size, crop_size: the patch's stored side and the training crop (official: 227 and 224).
        track_gap: frames between A and A' (the 2015 paper tracks each patch 30 frames).
        num_clusters, inter_neighbors: k-means clusters and neighbours per instance of the inter-instance edges
            (the paper clusters millions of patches; here 432 frames: a few clusters, 1 neighbour).
        mining_encoder: ``zoo.ssl.encoders.timm_encoder`` arguments of the frozen feature extractor;
            ``mining_weights``: a zoo checkpoint whose ``network.*`` weights it loads (``None``: random init from
            ``mining_seed``, which also seeds k-means).
        sequences: DAVIS sequence names (``None``: all in ``val_subset.txt``).
        batch_size: global number of pairs per step. The other arguments are ``SSLDataModule``'s.
    """

    def __init__(self, dataset: str = "cifar10_subset", edges: Literal["transitive", "intra"] = "transitive",
                 patch_size: int = 227, crop_size: int = 224, track_gap: int = 30, num_clusters: int = 4,
                 inter_neighbors: int = 1, mining_encoder: dict | None = None, mining_weights: str | None = None,
                 mining_seed: int = 0, sequences: list[str] | None = None, batch_size: int = 40,
                 steps_per_epoch: int | None = None, eval_batch_size: int = 256, bank_size: int | None = None,
                 bank_seed: int = 0, num_workers: int = 8, sampler_seed: int = 0, download: bool = True,
                 pin_memory: bool = True):
        crop = PatchCrop(crop_size)
        super().__init__(dataset, MultiView({"anchor": crop, "positive": crop}), batch_size, steps_per_epoch,
                         eval_batch_size, bank_size, bank_seed, num_workers, sampler_seed, download, pin_memory)
        if edges not in ("transitive", "intra"):
            raise ValueError(f"edges must be 'transitive' or 'intra', got {edges!r}")
        if crop_size > patch_size:
            raise ValueError(f"crop_size={crop_size} exceeds patch_size={patch_size}")
        self.edges, self.patch_size, self.crop, self.track_gap = edges, patch_size, crop, track_gap
        self.num_clusters, self.inter_neighbors = num_clusters, inter_neighbors
        self.mining_encoder = mining_encoder or {"name": "resnet18"}
        self.mining_weights, self.mining_seed, self.sequences = mining_weights, mining_seed, sequences
        self.pairs: np.ndarray | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.pairs is not None:
            return
        super().setup(stage)
        self.patches, self.video, self.frame, self.boxes = davis_patches(davis_root(), self.patch_size, self.sequences)
        self.instances = intra_instance_edges(self.video, self.frame, self.track_gap)
        if not len(self.instances):
            raise ValueError(f"track_gap={self.track_gap} leaves no intra-instance edge in the DAVIS sequences")
        if self.edges == "transitive":
            features = self.mining_features(self.patches[self.instances[:, 0]])
            self.inter_edges = inter_instance_edges(features, self.video[self.instances[:, 0]], self.num_clusters,
                                                    self.inter_neighbors, self.mining_seed)
            self.pairs = np.concatenate([self.instances, transitive_pairs(self.instances, self.inter_edges)])
        else:
            self.inter_edges = np.zeros((0, 2), dtype=np.int64)
            self.pairs = self.instances
        self.steps_per_epoch = self.requested_steps_per_epoch or max(len(self.pairs) // self.batch_size, 1)

    @torch.no_grad()
    def mining_features(self, patches: np.ndarray, chunk: int = 64) -> np.ndarray:
        """Pooled features of the frozen mining encoder (eval mode) on the patches, normalised as training is."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.mining_seed)
            encoder = timm_encoder(**self.mining_encoder)
        if self.mining_weights is not None:
            state = torch.load(self.mining_weights, map_location="cpu", weights_only=False)
            state = state.get("state_dict", state)
            encoder.load_state_dict({k.removeprefix("network."): v for k, v in state.items()
                                     if k.startswith("network.")})
        encoder.eval()
        x = torch.from_numpy(patches).permute(0, 3, 1, 2).float()
        return torch.cat([encoder((part - self.mean) / self.std) for part in x.split(chunk)]).numpy()

    def train_dataloader(self):
        dataset = PairDataset(self.patches, self.video, self.pairs, self.crop, self.data.x_train, self.data.y_train)
        return self.stream(dataset, self.batch_size, seed=self.sampler_seed)
