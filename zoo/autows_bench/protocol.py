"""The AutoWS protocol of AutoWS-Bench-101 (``fwrench/applications/pipeline.py``) up to the end model's inputs:

features -> 100 labeled points drawn from the validation split -> labeling functions -> label model on the votes
of the unlabeled train set -> probabilistic labels on the covered train points.

Data (offline): the WRENCH sets in ``<data>/weak_supervision/{youtube,sms,trec}`` (text, gold, the real LF votes)
and MNIST (``<data>/mnist``). LF-synthesis features: MNIST pixels in [0, 1] (``utils.normalize01``) -> PCA(100),
the pipeline's default ``embedding="pca"``; text -> TF-IDF (scikit-learn) -> PCA(100). PCA is fitted on the
unlabeled train split. End-model inputs: MNIST the 28x28 image (for the LeNet), text its TF-IDF PCA features.
"""
from __future__ import annotations

import gzip
import json
from dataclasses import dataclass

import numpy as np
from sklearn.decomposition import PCA
from sklearn.feature_extraction.text import TfidfVectorizer

from zoo.core.datasets import MissingDatasetError, require_file, load_mnist

from .snuba import ABSTAIN, one_vs_rest_snuba, snuba_votes

__all__ = ["AutoWSData", "WeakLabels", "class_balance", "coverage", "draw_labeled", "fit_label_model",
           "load_autows_data", "synthesized_weak_labels", "real_lf_weak_labels", "WRENCH_SETS"]

WRENCH_SETS = ("youtube", "sms", "trec")


@dataclass
class AutoWSData:
    """One task. ``*_x`` feed LF synthesis, ``*_inputs`` the end model; ``*_lf_votes`` the dataset's own LFs
    (WRENCH only, else None). ``valid`` is the pool the 100 labeled points are drawn from."""

    name: str
    num_classes: int
    train_x: np.ndarray
    train_inputs: np.ndarray
    train_y: np.ndarray
    valid_x: np.ndarray
    valid_inputs: np.ndarray
    valid_y: np.ndarray
    test_inputs: np.ndarray
    test_y: np.ndarray
    train_lf_votes: np.ndarray | None = None


def _wrench_split(name: str, split: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    how = ("The WRENCH sets (youtube, sms, trec) are in ../shared/data/weak_supervision (see its SOURCE.md); "
           "set ZOO_DATA_DIR to that data folder.")
    path = require_file(f"weak_supervision/{name}/{split}.json.gz", how)
    rows = list(json.load(gzip.open(path)).values())
    return ([r["data"]["text"] for r in rows], np.array([r["label"] for r in rows]),
            np.array([r["weak_labels"] for r in rows]))


def load_autows_data(name: str, embedding_dim: int = 100, max_train: int | None = None, max_valid: int | None = None,
                     seed: int = 0) -> AutoWSData:
    """``youtube`` / ``sms`` / ``trec`` (WRENCH) or ``mnist`` (train 50k / valid the last 10k of the official
    train split / test 10k). ``max_train`` / ``max_valid`` keep a random subset (CPU settings)."""
    rng = np.random.default_rng(seed)
    cap = lambda n, k: np.sort(rng.choice(n, k, replace=False)) if k and k < n else np.arange(n)  # noqa: E731
    if name == "mnist":
        images = load_mnist()
        x_all = images.x_train[..., 0].astype(np.float32) / 255.0
        y_all = images.y_train
        train, valid = cap(50_000, max_train), 50_000 + cap(10_000, max_valid)
        pca = PCA(embedding_dim, random_state=0).fit(x_all[train].reshape(len(train), -1))
        flat = lambda x: pca.transform(x.reshape(len(x), -1))  # noqa: E731
        test_images = images.x_test[..., 0].astype(np.float32) / 255.0
        return AutoWSData("mnist", 10, flat(x_all[train]), x_all[train], y_all[train], flat(x_all[valid]),
                          x_all[valid], y_all[valid], test_images, images.y_test)
    if name not in WRENCH_SETS:
        raise MissingDatasetError(f"unknown AutoWS dataset {name!r}; offline: mnist, {', '.join(WRENCH_SETS)}")
    (train_text, train_y, train_votes), (valid_text, valid_y, _), (test_text, test_y, _) = (
        _wrench_split(name, s) for s in ("train", "valid", "test"))
    train = cap(len(train_y), max_train)
    tfidf = TfidfVectorizer().fit([train_text[i] for i in train])
    pca = PCA(embedding_dim, random_state=0).fit(tfidf.transform([train_text[i] for i in train]).toarray())
    embed = lambda texts: pca.transform(tfidf.transform(texts).toarray()).astype(np.float32)  # noqa: E731
    train_x, valid_x = embed([train_text[i] for i in train]), embed(valid_text)
    num_classes = len(json.load(open(require_file(f"weak_supervision/{name}/label.json", ""))))
    return AutoWSData(name, num_classes, train_x, train_x, train_y[train], valid_x, valid_x, valid_y,
                      embed(test_text), test_y, train_votes[train])


def draw_labeled(num_valid: int, num_labeled: int, seed: int) -> np.ndarray:
    """Indices of the labeled points in the validation split (the pipeline takes the first ``n_labeled_points`` of
    a shuffled valid set; here a seeded draw so the seeds see different labels)."""
    return np.sort(np.random.default_rng(seed).choice(num_valid, min(num_labeled, num_valid), replace=False))


def class_balance(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """WRENCH's ``BaseLabelModel._init_balance`` from the labeled points: (counts + 1) / sum(counts) -- not
    renormalised, exactly as the label model receives it in the official pipeline."""
    counts = np.bincount(labels, minlength=num_classes).astype(float)
    return (counts + 1) / counts.sum()


def fit_label_model(votes: np.ndarray, balance: np.ndarray, seed: int, n_epochs: int = 100, lr: float = 0.01,
                    l2: float = 0.0):
    """Snorkel's ``LabelModel`` (MeTaL matrix completion, snorkel 0.10) with WRENCH ``Snorkel``'s defaults."""
    from snorkel.labeling.model import LabelModel

    model = LabelModel(cardinality=len(balance), verbose=False)
    model.fit(L_train=votes, class_balance=balance, n_epochs=n_epochs, lr=lr, l2=l2, seed=seed, progress_bar=False)
    return model


def coverage(votes: np.ndarray) -> np.ndarray:
    """Whether each point gets at least one non-abstain vote."""
    return (votes != ABSTAIN).any(1)


@dataclass
class WeakLabels:
    """Probabilistic labels on the covered train points, and the bookkeeping the results table reports."""

    covered: np.ndarray  # indices into the train split
    soft_labels: np.ndarray  # (len(covered), num_classes)
    num_lfs: int
    coverage: float
    label_accuracy: float  # of argmax soft labels on the covered points, against gold (reported, never used)


def _weak_labels(votes: np.ndarray, data: AutoWSData, labeled: np.ndarray, seed: int) -> WeakLabels:
    model = fit_label_model(votes, class_balance(data.valid_y[labeled], data.num_classes), seed)
    covered = np.flatnonzero(coverage(votes))
    soft = model.predict_proba(votes[covered]).astype(np.float32)
    accuracy = float((soft.argmax(1) == data.train_y[covered]).mean()) if len(covered) else 0.0
    return WeakLabels(covered, soft, votes.shape[1], len(covered) / len(votes), accuracy)


def synthesized_weak_labels(data: AutoWSData, labeled: np.ndarray, seed: int, **snuba_args) -> WeakLabels:
    """Snuba's LFs from the labeled points, then the label model on their train votes (``autows.run_snuba``)."""
    selectors = one_vs_rest_snuba(data.valid_x[labeled], data.valid_y[labeled], data.train_x, data.num_classes,
                                  **snuba_args)
    return _weak_labels(snuba_votes(selectors, data.train_x, data.num_classes), data, labeled, seed)


def real_lf_weak_labels(data: AutoWSData, labeled: np.ndarray, seed: int) -> WeakLabels:
    """The baseline: the same label model on the dataset's own (human-written) WRENCH LFs."""
    if data.train_lf_votes is None:
        raise ValueError(f"{data.name} has no labeling functions of its own")
    return _weak_labels(data.train_lf_votes, data, labeled, seed)
