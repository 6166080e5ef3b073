"""AutoWS-Bench-101 (``zoo.autows_bench``): Snuba's rules against the official code, the label model, abstains,
label leakage and the end model's loss.

Golden numbers: SprocketLab/AutoWS-Bench-101 @ 1553f26 (``git log -1``), ``fwrench/lf_selectors/snuba/``
(``Synthesizer.beta_optimizer`` with ``fwrench/utils/utils.py::mixture_metric``, ``LabelAggregator.train``,
``HeuristicGenerator.run_synthesizer/run_verifier/find_feedback`` with LogisticRegression LFs), run here on the
fixed inputs rebuilt below.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.tree import DecisionTreeClassifier

from zoo.autows_bench.module import soft_cross_entropy
from zoo.autows_bench.protocol import class_balance, coverage, draw_labeled, fit_label_model
from zoo.autows_bench.snuba import (ABSTAIN, LabelAggregator, LogisticLFs, Snuba, StumpLFs, abstain_threshold,
                                    abstain_thresholds, one_vs_rest_snuba, snuba_votes, weighted_f1)

# Synthesizer.beta_optimizer(p, y, scoring_fn=mixture_metric) on _beta_inputs()
GOLDEN_BETA = 0.25
# LabelAggregator().train(V, rate=1e-3, mu=1e-6) on _verifier_votes()
GOLDEN_WEIGHTS = [1.02117284, 0.84337354, 0.89579023, 0.97775101]
# the synthesize-verify loop, LogisticRegression LFs, digit 3 vs rest on digits PCA-10 (100 labeled, 500 unlabeled)
GOLDEN_FEATURES, GOLDEN_BETAS = [9, 4, 1], [0.361111, 0.272222, 0.361111]
GOLDEN_VOTE_SUMS, GOLDEN_VOTE_COUNTS = [-100.0, -100.0, -97.0], [100.0, 100.0, 97.0]


def _rng_inputs():
    rng = np.random.default_rng(0)
    y = rng.choice([-1, 1], 40)
    p = np.clip(0.5 + 0.35 * y * rng.random(40) + 0.2 * rng.standard_normal(40), 0, 1)
    return rng, y, p


def test_abstain_threshold_matches_official():
    _, y, p = _rng_inputs()
    assert abstain_threshold(p, y) == pytest.approx(GOLDEN_BETA)


def test_vectorised_thresholds_are_the_per_lf_ones():
    rng, y, p = _rng_inputs()
    proba = np.clip(p[:, None] + 0.1 * rng.standard_normal((40, 6)), 0, 1)
    assert abstain_thresholds(proba, y).tolist() == [abstain_threshold(proba[:, j], y) for j in range(6)]


@pytest.mark.parametrize("cardinality", [1, 2])
def test_vectorised_candidates_are_sklearns(cardinality):
    """The official code fits one scikit-learn model per feature subset; ours fits all at once."""
    rng = np.random.default_rng(2)
    x = np.round(rng.standard_normal((60, 5)), 1)  # ties in feature values, as PCA of sparse TF-IDF has
    y = np.where(x[:, 0] + 0.8 * rng.standard_normal(60) > 0, 1, -1)
    test_x = rng.standard_normal((200, 5))
    subsets = list(itertools.combinations(range(5), cardinality))
    logistic = LogisticLFs(subsets).fit(x, y).positive_proba(test_x)
    stumps = StumpLFs(subsets).fit(x, y).positive_proba(test_x)
    for j, s in enumerate(subsets):
        expected = LogisticRegression().fit(x[:, s], y).predict_proba(test_x[:, s])[:, 1]
        assert logistic[:, j] == pytest.approx(expected, abs=5e-4)  # lbfgs stops at tol 1e-4
        if cardinality == 1:  # several features: scikit-learn breaks ties between features at random
            tree = DecisionTreeClassifier(max_depth=1, random_state=0).fit(x[:, s], y)
            assert stumps[:, j].tolist() == tree.predict_proba(test_x[:, s])[:, 1].tolist()


def test_verifier_label_aggregator_matches_official():
    rng, _, _ = _rng_inputs()
    votes = rng.choice([-1, 0, 1], (30, 4)).astype(float)
    assert LabelAggregator().fit(votes).weights == pytest.approx(GOLDEN_WEIGHTS, abs=1e-7)


def test_snuba_loop_matches_official():
    digits = load_digits()
    x = PCA(10, random_state=0).fit_transform(digits.data / 16)
    y = np.where(digits.target == 3, 1, -1)
    snuba = Snuba(iterations=5, lf_kinds=("logistic",)).fit(x[:100], y[:100], x[100:600])
    assert [s[0] for s in snuba.feature_sets] == GOLDEN_FEATURES
    # the official argsort(f1)[-1] chooses among ties by sklearn's float rounding; ours takes the largest tied beta:
    # the chosen betas must score the same weighted F1 as the official ones
    for proba, beta, golden in zip(snuba.positive_proba(x[:100]).T, snuba.betas, GOLDEN_BETAS):
        ours, official = (f1_score(y[:100], np.where(proba >= 0.5 + b, 1, np.where(proba <= 0.5 - b, -1, 0)),
                                   average="weighted") for b in (beta, golden))
        assert ours == pytest.approx(official, abs=1e-12)
    votes = snuba.predict(x[600:700])  # {-1 abstain, 0 negative, 1 positive}
    signed = np.where(votes == ABSTAIN, 0, 2 * votes - 1)
    assert signed.sum(0)[[0, 2]].tolist() == [GOLDEN_VOTE_SUMS[0], GOLDEN_VOTE_SUMS[2]]  # same beta as official
    assert np.abs(signed).sum(0)[[0, 2]].tolist() == [GOLDEN_VOTE_COUNTS[0], GOLDEN_VOTE_COUNTS[2]]


def test_weighted_f1_is_sklearns_with_abstain_as_a_label():
    rng = np.random.default_rng(1)
    y = rng.choice([-1.0, 1.0], 60)
    votes = rng.choice([-1.0, 0.0, 1.0], (60, 5))
    expected = [f1_score(y, votes[:, j], average="weighted") for j in range(5)]
    assert weighted_f1(y, votes) == pytest.approx(expected)


def test_one_vs_rest_votes_only_their_class_or_abstain():
    digits = load_digits()
    x = PCA(8, random_state=0).fit_transform(digits.data / 16)
    selectors = one_vs_rest_snuba(x[:100], digits.target[:100], x[100:400], 10, iterations=1)
    votes = snuba_votes(selectors, x[400:500], 10)
    per_class = votes.reshape(100, 10, -1)  # each selector's LFs are contiguous columns
    for c in range(10):
        assert set(np.unique(per_class[:, c])) <= {ABSTAIN, c}
    assert coverage(np.full((3, 2), ABSTAIN)).tolist() == [False] * 3


def test_label_model_recovers_lf_accuracies_on_simulated_votes():
    """Test of the estimator only: votes simulated from a known conditionally independent LF model."""
    rng = np.random.default_rng(0)
    n, accuracies, propensity = 20_000, np.array([0.9, 0.8, 0.7, 0.65, 0.85]), 0.6
    y = rng.integers(0, 2, n)
    right = rng.random((n, 5)) < accuracies
    votes = np.where(right, y[:, None], 1 - y[:, None])
    votes = np.where(rng.random((n, 5)) < propensity, votes, ABSTAIN)
    model = fit_label_model(votes, np.array([0.5, 0.5]), seed=0, n_epochs=500)
    assert model.get_weights() == pytest.approx(accuracies, abs=0.04)
    assert (model.predict_proba(votes).argmax(1) == y)[coverage(votes)].mean() > 0.85


def test_class_balance_is_wrenchs_unnormalised_add_one():
    assert class_balance(np.array([0, 0, 1, 2]), 4).tolist() == [0.75, 0.5, 0.5, 0.25]


def test_labeled_points_come_from_the_validation_split_only():
    labeled = draw_labeled(120, 100, seed=3)
    assert len(set(labeled)) == 100 and labeled.max() < 120
    assert not np.array_equal(labeled, draw_labeled(120, 100, seed=4))
    from zoo.autows_bench.data import AutoWSDataModule, weak_supervision_step

    data = AutoWSDataModule("youtube", "few_shot", seed=0)
    data.setup()
    source = weak_supervision_step(*data.step_args)[0]  # youtube repeats some comments across splits: compare rows
    assert np.array_equal(data.train_set.inputs.numpy(), source.valid_inputs[data.labeled])
    assert np.array_equal(data.test_set.inputs.numpy(), source.test_inputs) and len(data.test_set) == len(source.test_y)


def test_soft_cross_entropy():
    logits = torch.randn(6, 3, requires_grad=True)
    soft = torch.softmax(torch.randn(6, 3), 1)
    assert soft_cross_entropy(logits, soft).item() == pytest.approx(F.cross_entropy(logits, soft).item(), abs=1e-6)
    hard = torch.tensor([0, 2, 1, 1, 0, 2])
    assert soft_cross_entropy(logits, F.one_hot(hard, 3).float()).item() == pytest.approx(F.cross_entropy(logits, hard).item(), abs=1e-6)
    soft_cross_entropy(logits, soft).backward()
    assert torch.allclose(logits.grad, (torch.softmax(logits, 1) - soft).detach() / 6, atol=1e-6)
