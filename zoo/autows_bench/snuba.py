"""Snuba (Varma & Ré, VLDB 2018) as AutoWS-Bench-101 runs it: labeling functions synthesised from 100 labels.

Follows ``fwrench/lf_selectors/snuba_lf_selector.py`` + ``snuba/{synthesizer,heuristic_generator,verifier,
label_aggregator}.py`` and ``fwrench/utils/utils.py::MulticlassAdaptor`` (SprocketLab/AutoWS-Bench-101 @ 1553f26):

- candidates: one depth-1 decision tree and one logistic regression per feature subset of size 1..``cardinality``
  (``run_snuba``'s default LF classes), fitted on the labeled points still "vague" (all of them at first); the
  official code fits one scikit-learn model per subset, here all subsets of a kind are fitted at once with numpy
  (:class:`StumpLFs` reproduces scikit-learn's stump exactly, :class:`LogisticLFs` its logistic regression to a few
  1e-4 in probability; tests check both against scikit-learn) -- the same LFs, ~100x less time;
- abstain threshold of a candidate: it votes +1 if P(+) >= b + beta, -1 if P(+) <= b - beta, else abstains;
  beta from ``linspace(0.25, 0.45, 10)`` maximising the weighted F1 on *all* labeled points, abstain counted as a
  third label (``mixture_metric`` with its default weights applies the metric to every point); the largest beta wins
  ties (``argsort(f1)[-1]``);
- pruning: 0.5 * micro-F1 (= accuracy with abstains counted wrong) + 0.5 * Jaccard distance of the candidate's
  coverage to the train points the committed LFs already label; keep 3 in the first iteration, then 1;
- verifier: Snorkel v0.4's naive-Bayes LF-accuracy model (:class:`LabelAggregator`) on the committed LFs' train
  votes; labeled points with |P(+) - 1/2| <= 1/2 - m^(-3/2) (m LFs) are the next iteration's fitting set;
  stop when there is none or after ``iterations``;
- final votes: betas re-tuned on all labeled points; more than two classes one-vs-rest, each class's LFs voting
  that class or abstaining (the adaptor's ``((w + 1) // 2) * (i + 1) - 1`` maps a "rest" vote to abstain).

Votes use the WRENCH convention: class index, ``-1`` = abstain.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np

__all__ = ["ABSTAIN", "BETA_GRID", "LF_FAMILIES", "LabelAggregator", "LogisticLFs", "Snuba", "StumpLFs",
           "abstain_threshold", "abstain_thresholds", "binary_votes", "jaccard_distance", "one_vs_rest_snuba",
           "snuba_votes", "vague_threshold", "weighted_f1"]

ABSTAIN = -1
BETA_GRID = np.linspace(0.25, 0.45, 10)  # synthesizer.beta_optimizer: 0.25 as the minimum "controls coverage better"


def binary_votes(positive_proba: np.ndarray, beta, b: float = 0.5) -> np.ndarray:
    """Snuba's vote in {-1, 0 (abstain), +1}: +1 at P(+) >= b + beta, -1 at P(+) <= b - beta (``beta`` a number
    or one per column)."""
    return np.where(positive_proba >= b + beta, 1.0, np.where(positive_proba <= b - beta, -1.0, 0.0))


def weighted_f1(y_pm: np.ndarray, votes: np.ndarray) -> np.ndarray:
    """scikit-learn's ``f1_score(y_pm, v, average="weighted")`` for every column ``v`` of ``votes`` at once:
    per true class c in {-1, +1}, F1_c = 2 TP_c / (#true_c + #predicted_c), weighted by #true_c; the abstain label
    0 has no true support, so it only lowers recall."""
    score = np.zeros(votes.shape[1])
    for c in (-1.0, 1.0):
        is_true = y_pm == c
        true_positive = (votes[is_true] == c).sum(0)
        score += is_true.sum() * 2 * true_positive / (is_true.sum() + (votes == c).sum(0)).clip(min=1)
    return score / len(y_pm)


def abstain_thresholds(positive_proba: np.ndarray, y_pm: np.ndarray, b: float = 0.5) -> np.ndarray:
    """Per column of ``positive_proba``: the beta of :data:`BETA_GRID` with the best weighted F1 of the votes
    (abstain = label 0) against ``y_pm`` in {-1, +1} on every labeled point; the largest such beta."""
    scores = np.stack([weighted_f1(y_pm, binary_votes(positive_proba, beta, b)) for beta in BETA_GRID])
    return BETA_GRID[len(BETA_GRID) - 1 - (scores[::-1] == scores.max(0)).argmax(0)]


def abstain_threshold(positive_proba: np.ndarray, y_pm: np.ndarray, b: float = 0.5) -> float:
    """:func:`abstain_thresholds` of one LF."""
    return float(abstain_thresholds(positive_proba[:, None], y_pm, b)[0])


def jaccard_distance(labeled_count: np.ndarray, votes: np.ndarray) -> np.ndarray:
    """Per candidate column of ``votes``: 1 - sum(min(|v|, n)) / sum(max(|v|, n)), n = how many committed LFs
    label each point (heuristic_generator.prune_heuristics)."""
    covered = np.abs(votes)
    return 1.0 - np.minimum(covered, labeled_count[:, None]).sum(0) / np.maximum(covered, labeled_count[:, None]).sum(0)


def vague_threshold(num_lfs: int) -> float:
    """gamma = 1/2 - m^(-3/2) (heuristic_generator.gamma_optimizer)."""
    return 0.5 - 1.0 / num_lfs ** 1.5


class LabelAggregator:
    """Snorkel v0.4's independent-LF model that Snuba's verifier trains (label_aggregator.py): P(+|votes) =
    sigmoid(votes . w), w fitted by momentum gradient steps towards each LF's empirical log-odds of being right,
    with an elastic-net shrinkage after each step.

    Args: ``rate`` 1e-3, ``mu`` 1e-6 (verifier.train_gen_model), ``alpha`` 0.5, ``n_iter`` 1000, ``tol`` 1e-6.
    """

    def __init__(self, rate: float = 1e-3, mu: float = 1e-6, alpha: float = 0.5, n_iter: int = 1000, tol: float = 1e-6):
        self.rate, self.mu, self.alpha, self.n_iter, self.tol = rate, mu, alpha, n_iter, tol

    def fit(self, votes: np.ndarray) -> "LabelAggregator":
        votes = votes.astype(float)
        weights, momentum = np.ones(votes.shape[1]), np.zeros(votes.shape[1])
        n_votes = np.abs(votes).sum(0)
        for step in range(self.n_iter):
            p_true = 1.0 / (1.0 + np.exp(-votes @ weights))
            agreement = (votes.T @ (2 * p_true - 1)) / (n_votes + 1e-8)  # (right - wrong) / votes, in expectation
            p_correct = (agreement + 1) / 2
            log_odds = np.clip(np.log(p_correct / (1 - p_correct)), -10, 10)
            momentum = 0.95 * (n_votes * (weights - log_odds)) / n_votes.sum() + 0.05 * momentum
            norm = np.sqrt(weights @ weights)
            if (norm < 1e-12 or np.sqrt(momentum @ momentum) / norm < self.tol) and step >= 10:
                break
            weights = weights - self.rate * momentum
            shrunk = np.maximum(np.abs(weights) - self.mu, 0.0)
            weights = np.sign(weights) * shrunk / (1 + (1 - self.alpha) * self.mu)
        self.weights = weights
        return self

    def marginals(self, votes: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-votes.astype(float) @ self.weights))


class StumpLFs:
    """One depth-1 decision tree per feature subset -- scikit-learn's ``DecisionTreeClassifier(max_depth=1)``
    (gini, float32 features, the first best split in ascending order, threshold the midpoint, leaf class
    fractions as probabilities) -- for all subsets at once. Several features in a subset: the best of their splits,
    the first feature of the subset among ties (scikit-learn visits them in a random order)."""

    def __init__(self, subsets: np.ndarray):
        self.subsets = np.asarray(subsets)

    def fit(self, x: np.ndarray, y_pm: np.ndarray) -> "StumpLFs":
        values = x.astype(np.float32)
        order = np.argsort(values, axis=0, kind="stable")
        sorted_values = np.take_along_axis(values, order, 0).astype(np.float64)
        positives_left = np.cumsum(y_pm[order] == 1, 0)[:-1].astype(np.float64)  # split after position i
        n, total_positive = len(y_pm), float((y_pm == 1).sum())
        n_left = np.arange(1, n, dtype=np.float64)[:, None]
        n_right = n - n_left
        negatives_left, positives_right = n_left - positives_left, total_positive - positives_left
        negatives_right = n_right - positives_right
        gini_left = 1.0 - (positives_left ** 2 + negatives_left ** 2) / (n_left * n_left)
        gini_right = 1.0 - (positives_right ** 2 + negatives_right ** 2) / (n_right * n_right)
        proxy = -n_right * gini_right - n_left * gini_left
        proxy[sorted_values[1:] <= sorted_values[:-1] + 1e-7] = -np.inf  # no split inside a run of equal values
        best = proxy.argmax(0)  # the first maximum, as the splitter's strict ``>``
        features = np.arange(x.shape[1])
        splits = np.isfinite(proxy[best, features])
        threshold = sorted_values[best, features] / 2.0 + sorted_values[best + 1, features] / 2.0
        left_positive = np.where(splits, positives_left[best, features] / (best + 1), total_positive / n)
        right_positive = np.where(splits, positives_right[best, features] / (n - best - 1), total_positive / n)
        chosen = self.subsets[np.arange(len(self.subsets)), np.where(splits, proxy[best, features], -np.inf)[
            self.subsets].argmax(1)]
        fitted = StumpLFs(self.subsets)
        fitted.feature, fitted.threshold = chosen, np.where(splits, threshold, np.inf)[chosen]
        fitted.left_positive, fitted.right_positive = left_positive[chosen], right_positive[chosen]
        return fitted

    def positive_proba(self, x: np.ndarray) -> np.ndarray:
        goes_left = x.astype(np.float32)[:, self.feature] <= self.threshold
        return np.where(goes_left, self.left_positive, self.right_positive)

    def select(self, columns) -> "StumpLFs":
        chosen = StumpLFs(self.subsets[columns])
        for name in ("feature", "threshold", "left_positive", "right_positive"):
            setattr(chosen, name, getattr(self, name)[columns])
        return chosen


class LogisticLFs:
    """One scikit-learn default ``LogisticRegression`` (L2 with C = 1, unpenalised intercept) per feature subset,
    all fitted at once by Newton's method to the exact optimum (scikit-learn's lbfgs stops at tol 1e-4: the
    probabilities agree to a few 1e-4)."""

    def __init__(self, subsets: np.ndarray, newton_steps: int = 30):
        self.subsets, self.newton_steps = np.asarray(subsets), newton_steps

    def _design(self, x: np.ndarray) -> np.ndarray:  # (subsets, points, features + 1)
        columns = x[:, self.subsets].transpose(1, 0, 2).astype(np.float64)
        return np.concatenate([columns, np.ones(columns.shape[:2] + (1,))], 2)

    def fit(self, x: np.ndarray, y_pm: np.ndarray) -> "LogisticLFs":
        design, target = self._design(x), (y_pm == 1).astype(np.float64)
        penalty = np.eye(design.shape[2])
        penalty[-1, -1] = 0.0
        weights = np.zeros(design.shape[::2])
        for _ in range(self.newton_steps):
            proba = 1.0 / (1.0 + np.exp(-np.einsum("snk,sk->sn", design, weights)))
            gradient = np.einsum("snk,sn->sk", design, proba - target) + weights @ penalty
            hessian = np.einsum("snk,sn,snl->skl", design, proba * (1 - proba), design) + penalty
            step = np.linalg.solve(hessian, gradient[..., None])[..., 0]
            weights = weights - step
            if np.abs(step).max() < 1e-10:
                break
        fitted = LogisticLFs(self.subsets, self.newton_steps)
        fitted.weights = weights
        return fitted

    def positive_proba(self, x: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-np.einsum("snk,sk->ns", self._design(x), self.weights)))

    def select(self, columns) -> "LogisticLFs":
        chosen = LogisticLFs(self.subsets[columns], self.newton_steps)
        chosen.weights = self.weights[columns]
        return chosen


LF_FAMILIES = {"stump": StumpLFs, "logistic": LogisticLFs}


def _one_class_fallback(x: np.ndarray, y_pm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The official fallback when the vague points are one class: a mirrored point of the other class."""
    if len(np.unique(y_pm)) > 1:
        return x, y_pm
    return np.vstack([x, -x[:1]]), np.append(y_pm, -y_pm[0])


@dataclass
class Snuba:
    """Binary Snuba on labels ``y_pm`` in {-1, +1}. Args: ``cardinality`` features per LF (paper setting 1),
    ``iterations`` (23, pipeline.py's ``snuba_iterations``), ``b`` the class-prior midpoint (0.5, run_snuba),
    ``lf_kinds`` the candidate families (depth-1 trees and logistic regression, run_snuba's default)."""

    cardinality: int = 1
    iterations: int = 23
    b: float = 0.5
    lf_kinds: tuple[str, ...] = ("stump", "logistic")
    lfs: list = field(default_factory=list)  # committed LFs, each a one-column StumpLFs / LogisticLFs

    @property
    def feature_sets(self) -> list[tuple[int, ...]]:
        return [tuple(int(f) for f in lf.subsets[0]) for lf in self.lfs]

    def positive_proba(self, x: np.ndarray) -> np.ndarray:
        """P(+) of every committed LF on ``x``, one column each."""
        return np.hstack([lf.positive_proba(x) for lf in self.lfs])

    def fit(self, labeled_x: np.ndarray, y_pm: np.ndarray, unlabeled_x: np.ndarray) -> "Snuba":
        # candidates in the official order: per LF kind, the subsets of size 1, ..., cardinality
        families = [LF_FAMILIES[kind](list(itertools.combinations(range(labeled_x.shape[1]), size)))
                    for kind in self.lf_kinds for size in range(1, self.cardinality + 1)]
        first_column = np.cumsum([0] + [len(family.subsets) for family in families])
        fit_on = np.arange(len(y_pm))
        committed_labeled, committed_unlabeled = np.zeros((len(y_pm), 0)), np.zeros((len(unlabeled_x), 0))
        for iteration in range(self.iterations):
            fit_x, fit_y = _one_class_fallback(labeled_x[fit_on], y_pm[fit_on])
            fitted = [family.fit(fit_x, fit_y) for family in families]
            labeled_proba = np.hstack([f.positive_proba(labeled_x) for f in fitted])  # kinds in order, as official
            betas = abstain_thresholds(labeled_proba, y_pm, self.b)
            accuracy = (binary_votes(labeled_proba, betas, self.b) == y_pm[:, None]).mean(0)  # micro F1: abstain wrong
            if iteration == 0:
                diversity = np.ones(len(betas))
            else:
                unlabeled_votes = binary_votes(np.hstack([f.positive_proba(unlabeled_x) for f in fitted]), betas, self.b)
                diversity = jaccard_distance(np.abs(verifier_votes).sum(1), unlabeled_votes)
            keep = 3 if iteration == 0 else 1
            for j in np.argsort(0.5 * accuracy + 0.5 * diversity)[::-1][:keep]:  # the official order among ties
                family = np.searchsorted(first_column, j, side="right") - 1
                lf = fitted[family].select([j - first_column[family]])
                self.lfs.append(lf)
                committed_labeled = np.hstack([committed_labeled, lf.positive_proba(labeled_x)])
                committed_unlabeled = np.hstack([committed_unlabeled, lf.positive_proba(unlabeled_x)])
            betas = abstain_thresholds(committed_labeled, y_pm, self.b)
            verifier_votes = binary_votes(committed_unlabeled, betas, self.b)
            verifier = LabelAggregator().fit(verifier_votes)
            labeled_marginals = verifier.marginals(binary_votes(committed_labeled, betas, self.b))
            fit_on = np.flatnonzero(np.abs(labeled_marginals - self.b) <= vague_threshold(len(self.lfs)))
            if len(fit_on) == 0:
                break
        self.betas = abstain_thresholds(committed_labeled, y_pm, self.b)
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Votes in {-1 abstain, 0 negative, 1 positive} (the selector's ``flip``)."""
        votes = binary_votes(self.positive_proba(x), self.betas, self.b)
        return np.where(votes == 0, ABSTAIN, (votes > 0).astype(int))


def one_vs_rest_snuba(labeled_x: np.ndarray, labels: np.ndarray, unlabeled_x: np.ndarray, num_classes: int,
                      **snuba_args) -> list[Snuba]:
    """One binary Snuba per class (class c positive), as ``MulticlassAdaptor``; binary tasks get a single one with
    class 1 positive, as ``run_snuba`` with ``k_cls == 2``."""
    positives = [1] if num_classes == 2 else range(num_classes)
    return [Snuba(**snuba_args).fit(labeled_x, np.where(labels == c, 1, -1), unlabeled_x) for c in positives]


def snuba_votes(selectors: list[Snuba], x: np.ndarray, num_classes: int) -> np.ndarray:
    """WRENCH-style votes (class index, -1 abstain) of every synthesised LF on ``x``."""
    if num_classes == 2:
        return selectors[0].predict(x)
    return np.hstack([np.where(s.predict(x) == 1, c, ABSTAIN) for c, s in enumerate(selectors)])
