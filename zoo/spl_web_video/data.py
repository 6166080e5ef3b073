"""A weakly labelled "web" set built from real images, beside a small clean target set (the paper's protocol).

The paper pre-trains on clips of web videos retrieved by querying the target class names: every clip carries its
video's query as a weak label ``w``. Its two kinds of noise (paper Sec. 1, Fig. 1), made here from real images:

- temporal noise: an untrimmed video for query ``q`` holds clips where the queried action is absent -> an image of
  another class, drawn uniformly, filed under query ``q`` (``absent_rate``);
- visual / sub-concept noise: the query retrieves a visually related concept -> an image of a semantically related
  class filed under its neighbour's query (cat <-> dog, automobile <-> truck, ...; ``related_rate``).

The clean target set is ``num_labels`` balanced images of the training split; the web set is every other training
image with its weak label. The test split stays clean. Each web item carries ``label`` = the weak label, ``true`` =
the image's real class (for analysis only, never for training), a ``weak`` training view and an un-augmented
``clip`` view that the teacher labels (the paper labels each clip once).

The paper's own data (Kinetics-200 target set + web videos queried by its class names) is not public:
``dataset="kinetics200"`` looks for it under ``$ZOO_DATA_DIR/kinetics200_web`` and stops with a clear message.
"""
from __future__ import annotations

import numpy as np
from lightning.pytorch.utilities.combined_loader import CombinedLoader

from zoo.core.data import ViewDataset
from zoo.core.datasets import MissingDatasetError, data_root
from zoo.core.views import Identity, View, WeakView
from zoo.semisup.data import SemiSupervisedDataModule

__all__ = ["RELATED_CLASSES", "WebVideoDataModule", "weak_labels"]

# visually related class pairs (each pair swaps in both directions)
RELATED_CLASSES = {
    "cifar10": ((3, 5), (1, 9), (0, 8), (4, 7), (2, 6)),   # cat/dog, automobile/truck, airplane/ship, deer/horse, bird/frog
    "cifar10_subset": ((3, 5), (1, 9), (0, 8), (4, 7), (2, 6)),
    "digits": ((1, 7), (3, 8), (4, 9), (5, 6), (0, 2)),     # the digits' usual confusions
}
KINETICS_HOW = ("the paper's Kinetics-200 target set (Xie et al. 2018 split of Kinetics-400) and its web videos, "
                "queried by the 200 class names, are not public: put decoded clips as "
                "kinetics200_web/{target_train,web,val}.npz (arrays x: uint8 N,H,W,C frames, y: int labels; "
                "web: y = the query label) under $ZOO_DATA_DIR")


def weak_labels(true_labels: np.ndarray, num_classes: int, related: tuple[tuple[int, int], ...],
                absent_rate: float, related_rate: float, seed: int) -> np.ndarray:
    """Query labels of web items whose real classes are ``true_labels``: each item independently gets, with
    probability ``related_rate``, the related class's query (when its class has one), else with probability
    ``absent_rate`` a uniformly drawn other class's query (the query's object is absent), else its own class."""
    rng = np.random.default_rng(seed)
    neighbour = np.arange(num_classes)
    for a, b in related:
        neighbour[a], neighbour[b] = b, a
    weak = true_labels.copy()
    draw = rng.random(len(weak))
    to_related = (draw < related_rate) & (neighbour[true_labels] != true_labels)
    to_absent = (draw >= related_rate) & (draw < related_rate + absent_rate)
    weak[to_related] = neighbour[true_labels[to_related]]
    other = (true_labels + rng.integers(1, num_classes, len(weak))) % num_classes   # any class but the real one
    weak[to_absent] = other[to_absent]
    return weak


class _WebSet(ViewDataset):
    """Web items: the view dict of :class:`ViewDataset` (``label`` = the weak label) plus the real class."""

    def __init__(self, images, weak, true, views):
        super().__init__(images, weak, views)
        self.true = true

    def __getitem__(self, key) -> dict:
        item = super().__getitem__(key)
        item["true"] = int(self.true[item["idx"]])
        return item


class WebVideoDataModule(SemiSupervisedDataModule):
    """``lb``: the clean target set; ``ulb``: the weakly labelled web set (``uratio`` x batch); val/test: clean.

    Args (beyond :class:`~zoo.semisup.data.SemiSupervisedDataModule`):
        absent_rate: share of web items whose query object is absent (temporal noise).
        related_rate: share of web items filed under a related class's query (sub-concept noise).
        noise_seed: seed of the weak-label draw (fixed: every arm of a comparison sees the same web set).
    """

    def __init__(self, dataset: str = "cifar10_subset", num_labels: int | None = 250, batch_size: int = 64,
                 uratio: int = 1, absent_rate: float = 0.3, related_rate: float = 0.15, noise_seed: int = 0,
                 labeled_views: dict[str, View] | None = None, web_view: View | None = None, **semisup):
        super().__init__(dataset=dataset, num_labels=num_labels, batch_size=batch_size, uratio=uratio,
                         labeled_views=labeled_views, include_labeled_in_unlabeled=False, **semisup)
        self.absent_rate, self.related_rate, self.noise_seed = absent_rate, related_rate, noise_seed
        self.web_views = {"weak": web_view if web_view is not None else WeakView(), "clip": Identity()}

    def prepare_data(self) -> None:
        if self.dataset == "kinetics200":
            self._require_kinetics()
        else:
            super().prepare_data()

    def _require_kinetics(self) -> None:
        folder = data_root() / "kinetics200_web"
        if not (folder / "web.npz").exists():
            raise MissingDatasetError(f"dataset file not found: {(folder / 'web.npz').resolve()}\n  {KINETICS_HOW}")
        raise NotImplementedError(f"found {folder}, but clip decoding and a video backbone (the paper's 3D CNN) are "
                                  "not in the zoo yet; the image stand-in is experiments/offline/spl_web_video_kinetics200.yaml")

    def setup(self, stage: str | None = None) -> None:
        if self.dataset == "kinetics200":
            self._require_kinetics()
        first = self.data is None
        super().setup(stage)
        if first:
            true = self.data.y_train[self.unlabeled_idx]
            self.web_true = true
            self.web_weak = weak_labels(true, self.data.num_classes, RELATED_CLASSES.get(self.dataset, ()),
                                        self.absent_rate, self.related_rate, self.noise_seed)

    def web_set(self, views: dict[str, View] | None = None) -> _WebSet:
        return _WebSet(self.data.x_train[self.unlabeled_idx], self.web_weak, self.web_true,
                       views if views is not None else self.web_views)

    def train_dataloader(self):
        return CombinedLoader({
            "lb": self.stream(self._train_set(self.labeled_idx, self.labeled_views), self.batch_size,
                              seed=self.sampler_seed * 2),
            "ulb": self.stream(self.web_set(), self.batch_size * self.uratio, seed=self.sampler_seed * 2 + 1),
        }, mode="min_size")

    def web_loader(self):
        """The web set in order, un-augmented (``clip`` view only): what the teacher labels once."""
        return self.eval_loader(self.web_set({"clip": Identity()}), self.eval_batch_size)

    def noise_summary(self) -> dict[str, float]:
        """Share of web items whose weak label is not their real class, by kind."""
        wrong = self.web_weak != self.web_true
        return {"web_items": float(len(self.web_weak)), "weak_label_noise": float(wrong.mean())}
