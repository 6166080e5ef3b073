"""Tables and their row stream.

A :class:`Table` is one fixed split of a dataset: train / val / test rows of numerical features standardised with
the train statistics, and labels (class indices, or float targets for regression). The split is stratified for
classification and depends only on ``split_seed``.

- Offline: scikit-learn's bundled ``breast_cancer``, ``wine``, ``digits`` (classification) and ``diabetes``
  (regression).
- The T-JEPA paper's tables (Jannis, Higgs, Helena, ALOI, Adult; California housing) come from OpenML /
  scikit-learn's fetchers, cached under ``$ZOO_DATA_DIR/tabular``; offline, a table not in the cache stops with a
  :class:`~zoo.core.datasets.MissingDatasetError` naming the folder and how to fill it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn import datasets as sk_datasets
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from torch.utils.data import Dataset

from zoo.core.data import StreamDataModule
from zoo.core.datasets import MissingDatasetError, data_root

__all__ = ["BUNDLED", "OPENML", "Table", "TabularDataModule", "load_table"]

BUNDLED = {"breast_cancer": (sk_datasets.load_breast_cancer, "classification"),
           "wine": (sk_datasets.load_wine, "classification"),
           "digits": (sk_datasets.load_digits, "classification"),
           "diabetes": (sk_datasets.load_diabetes, "regression")}
# the paper's tables (its src/datasets/*.py read the same OpenML files): name -> (OpenML data id, task)
OPENML = {"jannis": (41168, "classification"), "higgs": (23512, "classification"),
          "helena": (41169, "classification"), "aloi": (42396, "classification"),
          "adult": (1590, "classification")}


@dataclass
class Table:
    name: str
    task: str  # "classification" or "regression"
    x_train: np.ndarray  # (N, D) float32, standardised with the train statistics
    y_train: np.ndarray  # (N,) int64 class indices, or float32 targets
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def num_features(self) -> int:
        return self.x_train.shape[1]

    @property
    def num_classes(self) -> int:
        """Classes of a classification table; 1 for regression."""
        return int(self.y_train.max()) + 1 if self.task == "classification" else 1


def _raw_table(name: str, download: bool) -> tuple[np.ndarray, np.ndarray, str]:
    if name in BUNDLED:
        loader, task = BUNDLED[name]
        x, y = loader(return_X_y=True)
        return x, y, task
    cache = data_root() / "tabular"
    how = (f"run once with internet (download=True) to fill {cache.resolve()}, or copy a scikit-learn data_home "
           f"holding it there")
    try:
        if name == "california":
            x, y = sk_datasets.fetch_california_housing(data_home=cache, download_if_missing=download,
                                                        return_X_y=True)
            return x, y, "regression"
        if name in OPENML:
            data_id, task = OPENML[name]
            if not download and not (cache / "openml").exists():
                raise OSError("no OpenML cache and download=False")
            # liac-arff parser: no pandas needed; nominal columns arrive as category codes (numerical tokens)
            x, y = sk_datasets.fetch_openml(data_id=data_id, data_home=cache, as_frame=False, parser="liac-arff",
                                            return_X_y=True)
            return x, np.unique(y, return_inverse=True)[1], task
    except (OSError, IOError) as error:  # offline, or not cached with download=False
        raise MissingDatasetError(f"table {name!r} not found under {cache.resolve()} ({error})\n  {how}") from error
    raise ValueError(f"unknown table {name!r}; offline: {sorted(BUNDLED)}; paper: {sorted(OPENML) + ['california']}")


def load_table(name: str, split_seed: int = 0, val_size: float = 0.1, test_size: float = 0.1,
               download: bool = True) -> Table:
    """``name`` split into train / val / test (``val_size`` and ``test_size`` of all rows; the official probe's
    0.1 / 0.1), stratified by class, standardised with the train rows' mean and standard deviation."""
    x, y, task = _raw_table(name, download)
    x = np.nan_to_num(np.asarray(x, np.float64))
    stratify = y if task == "classification" else None
    x_rest, x_test, y_rest, y_test = train_test_split(x, y, test_size=test_size, random_state=split_seed,
                                                      stratify=stratify)
    x_train, x_val, y_train, y_val = train_test_split(
        x_rest, y_rest, test_size=val_size / (1 - test_size), random_state=split_seed,
        stratify=y_rest if task == "classification" else None)
    scaler = StandardScaler().fit(x_train)
    label_type = np.int64 if task == "classification" else np.float32
    return Table(name, task, *(a for xs, ys in ((x_train, y_train), (x_val, y_val), (x_test, y_test))
                                for a in (scaler.transform(xs).astype(np.float32), ys.astype(label_type))))


class _Rows(Dataset):
    def __init__(self, x: np.ndarray, y: np.ndarray):
        self.x, self.y = torch.from_numpy(x), torch.from_numpy(y)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, key) -> dict:
        # the stream yields (index, per-draw seed): a method draws its per-row randomness (masks) from the seed
        index, seed = key if isinstance(key, tuple) else (key, key)
        return {"idx": index, "seed": seed, "x": self.x[index], "label": self.y[index]}


class TabularDataModule(StreamDataModule):
    """Batches ``{"idx", "seed", "x" (B, D) float32, "label"}`` of a table's rows: training draws from the train
    split on the stream contract, validation runs over the val split in order.

    Args:
        dataset: a name of ``BUNDLED``, ``OPENML`` or ``california``.
        split_seed: seed of the train / val / test split (and of the training stream).
        batch_size: global training batch (the paper's 512).
        steps_per_epoch: default one pass over the train rows (rounded up, as the official loader without drop_last).
        download: fetch a paper table missing from ``$ZOO_DATA_DIR/tabular``.
    """

    def __init__(self, dataset: str = "breast_cancer", split_seed: int = 0, batch_size: int = 512,
                 eval_batch_size: int = 1024, steps_per_epoch: int | None = None, num_workers: int = 0,
                 download: bool = True):
        super().__init__()
        self.dataset, self.split_seed, self.download = dataset, split_seed, download
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self._steps_per_epoch = steps_per_epoch
        self.table: Table | None = None

    @property
    def steps_per_epoch(self) -> int:
        return self._steps_per_epoch or -(-len(self.load().y_train) // self.batch_size)

    def load(self) -> Table:
        if self.table is None:
            self.table = load_table(self.dataset, self.split_seed, download=self.download)
        return self.table

    def setup(self, stage: str | None = None) -> None:
        self.load()

    def train_dataloader(self):
        table = self.load()
        return self.stream(_Rows(table.x_train, table.y_train), self.batch_size, seed=self.split_seed)

    def val_dataloader(self):
        table = self.load()
        return self.eval_loader(_Rows(table.x_val, table.y_val), self.eval_batch_size)
