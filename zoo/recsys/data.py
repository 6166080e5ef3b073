"""Interaction logs with categorical user and item features, and their streams on the zoo's data contract.

Every feature is a table of integer codes, one row per user or item: ``1..V`` are values, ``0`` is padding (and
"unknown"). A single-valued feature has width 1; a multi-valued one (genres, title words) is padded to its widest row.
Ratings are used as implicit interactions (any rating = the user interacted with the item).

- MovieLens-100k: the offline copy under ``<ZOO_DATA_DIR>/movielens100k/ml100k.npz`` with the official splits
  (``u1``..``u5``: 80/20 five-fold, ``ua``/``ub``: 10 test ratings per user).
- MovieLens-1M: the GroupLens files under ``<ZOO_DATA_DIR>/movielens1m/ml-1m/`` (downloaded there with internet). It
  has no official split: a fixed random 20 % of the ratings (seed 0) is the test split, the ``u1`` protocol's share.
"""
from __future__ import annotations

import re
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.utilities.combined_loader import CombinedLoader
from torch.utils.data import Dataset

from zoo.core.data import StreamDataModule
from zoo.core.datasets import MissingDatasetError, require_file, data_root

__all__ = ["Interactions", "InteractionsDataModule", "load_interactions", "INTERACTION_SETS"]

ML1M_URL = "https://files.grouplens.org/datasets/movielens/ml-1m.zip"
AGE_BUCKETS = (18, 25, 35, 45, 50, 56)  # MovieLens-1M's age groups (README of ml-1m), applied to 100k's ages too
TITLE_MIN_COUNT = 2  # a title word is a value if it appears in at least 2 titles (else it only identifies the item)
TITLE_MAX_WORDS = 8


@dataclass
class Interactions:
    """Users, items, their features and the train/test interactions (0-based user and item indices)."""
    name: str
    user_features: dict[str, np.ndarray]  # name -> (num_users, width) int64 codes, 0 = padding
    item_features: dict[str, np.ndarray]  # name -> (num_items, width)
    train: np.ndarray  # (n_train, 2) [user, item]
    test: np.ndarray  # (n_test, 2)

    @property
    def num_users(self) -> int:
        return len(next(iter(self.user_features.values())))

    @property
    def num_items(self) -> int:
        return len(next(iter(self.item_features.values())))

    def item_counts(self) -> np.ndarray:
        """Training interactions per item, (num_items,)."""
        return np.bincount(self.train[:, 1], minlength=self.num_items)

    def holdout(self, fraction: float, seed: int) -> "Interactions":
        """A validation split carved from the *training* interactions: a random ``fraction`` of them (fixed by
        ``seed``) becomes the evaluated split and the rest the training split; the test split is dropped, so a
        hyper-parameter chosen on it never sees the test interactions."""
        held = np.random.default_rng(seed).random(len(self.train)) < fraction
        return Interactions(f"{self.name}_val{fraction:g}", self.user_features, self.item_features,
                            self.train[~held], self.train[held])

    def subsample(self, fraction: float, seed: int) -> "Interactions":
        """Only a random ``fraction`` of the training interactions (fixed by ``seed``), the evaluated split kept: the
        sparse-feedback regime (every item's count shrinks, so more items are rare or never seen)."""
        kept = np.random.default_rng(seed).random(len(self.train)) < fraction
        return Interactions(f"{self.name}_train{fraction:g}", self.user_features, self.item_features,
                            self.train[kept], self.test)

    def schema(self) -> dict[str, dict[str, int]]:
        """``{"user": {feature: vocabulary size incl. padding}, "item": {...}}``: what the towers' tables need."""
        return {side: {name: int(codes.max()) + 1 for name, codes in features.items()}
                for side, features in (("user", self.user_features), ("item", self.item_features))}


# ------------------------------------------------------------------------------------------ feature encoding
def categorical(values) -> np.ndarray:
    """Codes 1..V of ``values`` (sorted order), as a (N, 1) column; ``None`` / empty strings become 0."""
    values = np.asarray([("" if v is None else str(v)) for v in values])
    vocabulary = np.unique(values[values != ""])
    codes = np.zeros(len(values), np.int64)
    known = values != ""
    codes[known] = np.searchsorted(vocabulary, values[known]) + 1
    return codes[:, None]


def multi_valued(rows: list[list[str]], min_count: int = 1, max_width: int | None = None) -> np.ndarray:
    """Padded codes of each row's values (values seen in fewer than ``min_count`` rows are dropped)."""
    counts: dict[str, int] = {}
    for row in rows:
        for value in set(row):
            counts[value] = counts.get(value, 0) + 1
    vocabulary = {v: i + 1 for i, v in enumerate(sorted(v for v, c in counts.items() if c >= min_count))}
    coded = [[vocabulary[v] for v in dict.fromkeys(row) if v in vocabulary][:max_width] for row in rows]
    out = np.zeros((len(rows), max(1, max(map(len, coded)))), np.int64)
    for i, row in enumerate(coded):
        out[i, :len(row)] = row
    return out


def _title_words(title: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", re.sub(r"\(\d{4}\)\s*$", "", title).lower())


def _year(text: str) -> str:
    match = re.search(r"(\d{4})", text)
    return match.group(1) if match else ""


def item_feature_table(titles: list[str], years: list[str], genres: list[list[str]]) -> dict[str, np.ndarray]:
    """The item features both MovieLens sets share: id, release year, decade, genres and title words."""
    return {
        "item_id": np.arange(1, len(titles) + 1, dtype=np.int64)[:, None],
        "year": categorical(years),
        "decade": categorical([y[:3] if y else "" for y in years]),
        "genres": multi_valued(genres),
        "title_words": multi_valued([_title_words(t) for t in titles], TITLE_MIN_COUNT, TITLE_MAX_WORDS),
    }


def user_feature_table(ages, genders, occupations, zips) -> dict[str, np.ndarray]:
    """User id, age group, gender, occupation and the zip code's first three characters."""
    return {
        "user_id": np.arange(1, len(ages) + 1, dtype=np.int64)[:, None],
        "age": categorical(np.searchsorted(AGE_BUCKETS, np.asarray(ages, np.int64), side="right")),
        "gender": categorical(genders),
        "occupation": categorical(occupations),
        "zip3": categorical([str(z)[:3] for z in zips]),
    }


# ------------------------------------------------------------------------------------------------ loaders
ML100K_SPLITS = ("u1", "u2", "u3", "u4", "u5", "ua", "ub")


def load_movielens100k(split: str = "u1", download: bool = False) -> Interactions:
    """MovieLens-100k with one of its official splits (``u1``..``u5``, ``ua``, ``ub``)."""
    if split not in ML100K_SPLITS:
        raise ValueError(f"unknown MovieLens-100k split {split!r}; official splits: {ML100K_SPLITS}")
    d = np.load(require_file("movielens100k/ml100k.npz", "It ships in the zoo's shared offline data (set "
                         "ZOO_DATA_DIR=../shared/data); the raw files are at "
                         "https://files.grouplens.org/datasets/movielens/ml-100k.zip"))
    pairs = np.stack([d["user_id"].astype(np.int64) - 1, d["item_id"].astype(np.int64) - 1], 1)
    is_test = d["fold_u1_u5"] == int(split[1]) - 1 if split[1].isdigit() else d[f"{split}_test"]
    genre_names = [str(g) for g in d["genre_names"]]
    genres = [[genre_names[g] for g in np.flatnonzero(row)] for row in d["item_genres"]]
    items = item_feature_table([str(t) for t in d["item_title"]], [_year(str(r)) for r in d["item_release_date"]],
                               genres)
    users = user_feature_table(d["user_age"], d["user_gender"], d["user_occupation"], d["user_zip"])
    return Interactions(f"movielens100k_{split}", users, items, pairs[~is_test], pairs[is_test])


def _read_dat(path: Path) -> list[list[str]]:
    return [line.split("::") for line in path.read_text(encoding="latin-1").splitlines() if line]


def load_movielens1m(split: str = "random20", download: bool = True) -> Interactions:
    """MovieLens-1M from ``<ZOO_DATA_DIR>/movielens1m/ml-1m/{ratings,users,movies}.dat`` (downloaded with
    ``download`` and internet); test split: a fixed random 20 % of the ratings (seed 0)."""
    if split != "random20":
        raise ValueError(f"MovieLens-1M has no official split; the only split here is 'random20', not {split!r}")
    folder = data_root() / "movielens1m" / "ml-1m"
    if not (folder / "ratings.dat").exists() and download:
        try:
            archive, _ = urllib.request.urlretrieve(ML1M_URL)
            with zipfile.ZipFile(archive) as z:
                z.extractall(folder.parent)
        except OSError as err:
            raise MissingDatasetError(f"MovieLens-1M is not in {folder.resolve()} and could not be downloaded "
                                      f"({type(err).__name__}: {err}).\n  Download {ML1M_URL} and unzip it into "
                                      f"{folder.parent.resolve()}.") from err
    if not (folder / "ratings.dat").exists():
        raise MissingDatasetError(f"MovieLens-1M not found: {(folder / 'ratings.dat').resolve()}\n  Download "
                                  f"{ML1M_URL} and unzip it into {folder.parent.resolve()} (or rerun with "
                                  "download=true and internet).")
    users = _read_dat(folder / "users.dat")  # UserID::Gender::Age::Occupation::Zip-code, ids 1..6040
    movies = _read_dat(folder / "movies.dat")  # MovieID::Title::Genres (|-separated), ids 1..3952 with gaps
    ratings = np.array([r[:2] for r in _read_dat(folder / "ratings.dat")], np.int64)
    movie_index = {int(m[0]): i for i, m in enumerate(movies)}
    pairs = np.stack([ratings[:, 0] - 1, np.array([movie_index[m] for m in ratings[:, 1]])], 1)
    is_test = np.random.default_rng(0).random(len(pairs)) < 0.2
    items = item_feature_table([m[1] for m in movies], [_year(m[1][-6:]) for m in movies],
                               [m[2].split("|") for m in movies])
    user_table = user_feature_table([int(u[2]) for u in users], [u[1] for u in users], [u[3] for u in users],
                                    [u[4] for u in users])
    return Interactions("movielens1m_random20", user_table, items, pairs[~is_test], pairs[is_test])


INTERACTION_SETS = {"movielens100k": load_movielens100k, "movielens1m": load_movielens1m}


def load_interactions(name: str, split: str | None = None, download: bool = False) -> Interactions:
    if name not in INTERACTION_SETS:
        raise ValueError(f"unknown interaction set {name!r}; available: {sorted(INTERACTION_SETS)}")
    loader = INTERACTION_SETS[name]
    return loader(download=download) if split is None else loader(split, download=download)


# ------------------------------------------------------------------------------------------------ datasets
def as_tensors(table: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {name: torch.from_numpy(np.ascontiguousarray(codes)) for name, codes in table.items()}


def _indices(keys: list) -> torch.Tensor:
    # FixedLengthSampler yields (index, augmentation seed); evaluation loaders plain indices
    return torch.tensor([key[0] if isinstance(key, tuple) else key for key in keys])


class InteractionSet(Dataset):
    """Training interactions. Items are looked up a whole batch at a time in :meth:`collate` (one indexing per
    feature table instead of a dict per example): ``{"idx", "user": {feature: codes}, "item": {feature: codes},
    "item_id"}``."""

    def __init__(self, pairs: np.ndarray, users: dict[str, torch.Tensor], items: dict[str, torch.Tensor]):
        self.pairs, self.users, self.items = torch.from_numpy(pairs), users, items

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, key):
        return key

    def collate(self, keys: list) -> dict:
        idx = _indices(keys)
        users, items = self.pairs[idx].unbind(1)
        return {"idx": idx, "user": {name: codes[users] for name, codes in self.users.items()},
                "item": {name: codes[items] for name, codes in self.items.items()}, "item_id": items}


class RowSet(Dataset):
    """Rows of one feature table (the item corpus, or the evaluated users), looked up per batch in :meth:`collate`:
    ``{"idx", "<side>": {feature: codes}}``."""

    def __init__(self, table: dict[str, torch.Tensor], side: str, rows: np.ndarray | None = None):
        self.table, self.side = table, side
        self.rows = torch.arange(len(next(iter(table.values())))) if rows is None else torch.from_numpy(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key):
        return key

    def collate(self, keys: list) -> dict:
        rows = self.rows[_indices(keys)]
        return {"idx": rows, self.side: {name: codes[rows] for name, codes in self.table.items()}}


class InteractionsDataModule(StreamDataModule):
    """Training streams ``CombinedLoader({"interactions", "items"})`` and the test users for retrieval evaluation.

    - ``interactions``: (query features, positive item id + item features) pairs drawn from the training split, so
      items come with their popularity (the main task's distribution);
    - ``items``: items drawn uniformly from the item corpus (each epoch permutes the catalog), the distribution an
      auxiliary item-side task samples from when it must not follow popularity; left out when ``item_batch_size``
      is 0.

    Args:
        dataset, split, download: which interactions (see :data:`INTERACTION_SETS`).
        batch_size: global batch of training interactions.
        item_batch_size: global batch of corpus items (0: no item stream).
        steps_per_epoch: default: one pass over the training interactions.
        eval_batch_size: users per evaluation batch (per process).
        validation_fraction: if > 0, evaluate on this share of the training interactions, held out of training
            (:meth:`Interactions.holdout`), instead of the test split: for choosing hyper-parameters.
        train_fraction: train on only this share of the (remaining) training interactions
            (:meth:`Interactions.subsample`): the sparse regime.
        split_seed: fixes the held-out and the kept interactions, the same for every training ``seed``.
    """

    def __init__(self, dataset: str = "movielens100k", split: str | None = "u1", batch_size: int = 1024,
                 item_batch_size: int = 1024, steps_per_epoch: int | None = None, eval_batch_size: int = 256,
                 num_workers: int = 0, seed: int = 0, download: bool = False, validation_fraction: float = 0.0,
                 train_fraction: float = 1.0, split_seed: int = 0):
        super().__init__()
        self.validation_fraction, self.train_fraction, self.split_seed = validation_fraction, train_fraction, split_seed
        self.dataset, self.split, self.download = dataset, split, download
        self.batch_size, self.item_batch_size, self.eval_batch_size = batch_size, item_batch_size, eval_batch_size
        self.requested_steps, self.num_workers, self.seed = steps_per_epoch, num_workers, seed
        self.data: Interactions | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.data is not None:
            return
        data = load_interactions(self.dataset, self.split, self.download)
        if self.validation_fraction > 0:
            data = data.holdout(self.validation_fraction, self.split_seed)
        if self.train_fraction < 1:
            data = data.subsample(self.train_fraction, self.split_seed + 1)
        self.data = data
        self.steps_per_epoch = self.requested_steps or max(1, len(self.data.train) // self.batch_size)
        self.users, self.items = as_tensors(self.data.user_features), as_tensors(self.data.item_features)
        self.schema = self.data.schema()
        self.train_set = InteractionSet(self.data.train, self.users, self.items)
        self.item_set = RowSet(self.items, "item")
        self.test_user_set = RowSet(self.users, "user", np.unique(self.data.test[:, 0]))

    def interaction_matrix(self, split: str) -> torch.Tensor:
        """(num_users, num_items) bool: who interacted with what in ``split`` (``train`` or ``test``, the evaluated
        split: the validation split when ``validation_fraction`` > 0)."""
        pairs = torch.from_numpy(getattr(self.data, split))
        matrix = torch.zeros(self.data.num_users, self.data.num_items, dtype=torch.bool)
        matrix[pairs[:, 0], pairs[:, 1]] = True
        return matrix

    def train_dataloader(self):
        streams = {"interactions": self.stream(self.train_set, self.batch_size, seed=self.seed,
                                               collate_fn=self.train_set.collate)}
        if self.item_batch_size:
            streams["items"] = self.stream(self.item_set, self.item_batch_size, seed=self.seed + 1,
                                           collate_fn=self.item_set.collate)
        return CombinedLoader(streams, mode="min_size")

    def val_dataloader(self):
        return self.eval_loader(self.test_user_set, self.eval_batch_size, collate_fn=self.test_user_set.collate)
