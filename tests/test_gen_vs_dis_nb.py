"""Naive Bayes vs logistic regression (Zheng et al., ICML 2023): parity of the shared-variance naive Bayes with the
official code, the rule that makes it the paper's (linear) model, and the sweep protocol (min-max on the training
subsample only, the same subsamples for both classifiers, every class present)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from zoo.gen_vs_dis_nb.naive_bayes import SharedVarianceGaussianNB
from zoo.gen_vs_dis_nb.study import claim_check, digits_pixel_bank, paper_classifiers, run_study
from zoo.ssl.bank import FeatureBank, SweepResult, draw_subsample, sample_size_sweep, scale_on_subsample

# ---------------------------------------------------------------------------------------------- golden numbers
# Produced by running the official code: ML-GSAI/Revisiting-Dis-vs-Gen-Classifiers at commit
# 86a0bcc9509b34af1d44e6028579aaa32cdec07f, models/gaussnb.py::GaussianNB (fit, then predict; the joint
# log-likelihood captured at predict's np.argmax; the shared variance as predict computes it,
# np.sum(vars_groupby * prior)), under numpy 1.23.5 / pandas 1.5.3 (the repository pins pandas 1.4.4, which has no
# Python 3.11 wheel; 1.5.3 keeps its groupby.apply behaviour). Fitting the same data in two chunks (its incremental
# moments) gave the same predictions and log-likelihoods to 7e-15. Inputs: 3 classes with 5/9/16 samples and
# class-dependent spreads, 4 features (numpy default_rng(20230206), rounded to 6 decimals).
X = np.array([
    [3.705283, 4.247071, -15.15386, 3.263445], [1.392141, 8.674398, -9.360014, 3.006269],
    [1.45775, 7.241658, -0.945721, 2.944576], [2.542075, 2.593002, -4.029284, 3.05633],
    [1.907581, -4.353084, -7.809302, 1.505314], [1.343979, 3.517799, -5.529306, 3.911506],
    [0.830212, 3.982443, 0.069167, 2.620468], [0.990332, 6.140982, -6.043859, 4.65665],
    [0.390029, 4.505743, 1.670863, 2.613403], [1.493758, 4.770293, 3.280653, 1.32042],
    [1.741352, 7.088046, 0.208125, 3.767457], [2.486957, 4.369306, -6.125192, 3.698559],
    [3.329551, 1.674346, -4.976374, 1.315288], [1.375803, 2.897648, 2.571667, 3.708676],
    [3.210014, -1.192512, 7.010397, 3.524469], [-0.607578, 1.432723, -0.019837, 0.628865],
    [0.602406, 1.275631, -0.974916, 0.730905], [2.301493, 3.736194, -1.961296, 1.853076],
    [0.612767, 8.601896, 11.04424, 3.560971], [0.591265, 0.612236, -0.288916, 0.902564],
    [2.912823, 6.063785, -3.439007, 3.774868], [-0.716125, 0.247129, -2.403543, 0.887051],
    [0.941043, 2.889865, -1.719585, 1.986036], [1.68843, 5.953783, -0.35293, 1.843248],
    [0.653627, 2.475126, -5.120188, 1.922162], [0.760192, 2.330795, 0.171631, 2.018353],
    [0.518057, -0.599524, 12.689975, 3.2413], [2.10422, 5.635116, 3.29424, 2.506403],
    [0.373802, 1.409422, 1.052453, 0.763381], [0.208018, 5.349683, 5.422859, 2.103635],
])
Y = np.array([2, 2, 2, 2, 2, 2, 2, 2, 1, 1, 2, 2, 1, 2, 2, 0, 0, 2, 2, 0, 2, 0, 1, 1, 1, 1, 2, 1, 0, 1])
X_TEST = np.array([
    [0.036572, 2.048257, -1.296863, 2.407267], [4.302624, 0.142842, 0.506565, -0.882339],
    [0.559428, 0.123275, 1.621743, 1.179095], [0.314247, -0.137134, 6.543164, 6.546664],
    [2.661655, -0.342152, -3.284206, -0.889186], [-2.353928, 0.416543, 4.62603, -1.308263],
    [-2.05846, 5.980649, -3.108101, 4.586969], [-1.751329, -0.270236, 2.620413, 1.777233],
    [0.138101, -2.971081, -0.552424, 5.077877], [-0.647987, 0.36346, -7.430517, 0.412349],
    [3.241883, 0.059374, 0.074343, -0.931296], [5.039454, 3.246887, -1.085517, -1.006891],
])
OFFICIAL_PREDICTIONS = [1, 0, 0, 2, 0, 0, 2, 0, 2, 0, 0, 1]
OFFICIAL_SHARED_VARIANCE = [0.7660588597825665, 7.182763607882158, 30.789990585241828, 0.35888714349648504]
OFFICIAL_PRIOR = [0.16666666666666666, 0.3, 0.5333333333333333]
OFFICIAL_JOINT_LOG_LIKELIHOOD_FIRST3 = [
    [-5.556253987962444, -2.790651533346077, -3.989247428300393],
    [-17.532175263752578, -19.404169480013287, -29.54740691359656],
    [-2.3089707304217875, -3.4498306162252486, -8.885721351605033]]

# Same commit, main_train_offline.py's --minmax path (sklearn MinMaxScaler fit on the training subsample, the test
# set transformed with it) then GaussianNB, on scikit-learn's digits (64 raw pixels; stratified 70/30 split with
# random_state=0) with the subsample default_rng(m).choice(1257, m, replace=False): test error and the first 20
# test predictions.
OFFICIAL_DIGITS = {
    40: (0.18518518518518523, [1, 4, 5, 6, 3, 1, 2, 2, 2, 0, 7, 5, 4, 9, 6, 6, 9, 2, 0, 3]),
    100: (0.1333333333333333, [1, 4, 5, 6, 9, 1, 2, 2, 2, 0, 7, 8, 4, 9, 6, 6, 8, 2, 0, 9]),
    400: (0.10925925925925928, [1, 4, 5, 6, 9, 1, 2, 2, 2, 0, 7, 5, 4, 9, 6, 6, 1, 2, 0, 9]),
}


def test_naive_bayes_matches_the_official_code_on_fixed_inputs():
    nb = SharedVarianceGaussianNB().fit(X, Y)
    np.testing.assert_allclose(nb.class_prior_, OFFICIAL_PRIOR, rtol=1e-12)
    np.testing.assert_allclose(nb.shared_variance_, OFFICIAL_SHARED_VARIANCE, rtol=1e-12)
    np.testing.assert_allclose(nb.joint_log_likelihood(X_TEST[:3]), OFFICIAL_JOINT_LOG_LIKELIHOOD_FIRST3, rtol=1e-10)
    assert nb.predict(X_TEST).tolist() == OFFICIAL_PREDICTIONS


@pytest.mark.parametrize("m", sorted(OFFICIAL_DIGITS))
def test_minmax_naive_bayes_on_digits_matches_the_official_pipeline(m):
    bank = digits_pixel_bank()
    indices = np.random.default_rng(m).choice(len(bank.train_labels), size=m, replace=False)
    train, test = scale_on_subsample(bank.train_features[indices], bank.test_features, "minmax")
    nb = SharedVarianceGaussianNB(10).fit(train, bank.train_labels[indices])
    error, first20 = OFFICIAL_DIGITS[m]
    assert nb.predict(test)[:20].tolist() == first20
    assert 1 - nb.score(test, bank.test_labels) == pytest.approx(error, abs=1e-12)


# ------------------------------------------------------------------------------------------ the model's rule
# One feature; class 0 tight around 0 (variance 0.01), class 1 wide around 1 (variance 100), equal priors. The
# shared variance is 50.005, so the boundary is the midpoint 0.5 and -0.5 and 0.4 are class 0. A naive Bayes with a
# variance per class (quadratic boundary) calls both class 1: N(0, 0.01) gives them almost no density.
CRAFTED_X = np.array([[-0.1], [0.1], [-9.0], [11.0]])
CRAFTED_Y = np.array([0, 0, 1, 1])
CRAFTED_TEST = np.array([[-0.5], [0.4], [0.6], [3.0]])
SHARED_VARIANCE_ANSWER = [0, 0, 1, 1]


def test_the_variance_is_shared_across_classes_weighted_by_the_priors():
    nb = SharedVarianceGaussianNB().fit(CRAFTED_X, CRAFTED_Y)
    np.testing.assert_allclose(nb.class_variances_[:, 0], [0.01 + 1e-9, 100 + 1e-9])
    np.testing.assert_allclose(nb.shared_variance_, [0.5 * 0.01 + 0.5 * 100 + 1e-9])
    assert nb.predict(CRAFTED_TEST).tolist() == SHARED_VARIANCE_ANSWER


def test_a_per_class_variance_naive_bayes_answers_differently_on_the_crafted_input():
    """The crafted input separates the two models: scikit-learn's GaussianNB (a variance per class) fails the
    assertion above, so the test above fails on the wrong model."""
    from sklearn.naive_bayes import GaussianNB

    per_class = GaussianNB(var_smoothing=1e-9).fit(CRAFTED_X, CRAFTED_Y).predict(CRAFTED_TEST).tolist()
    assert per_class == [1, 1, 1, 1] != SHARED_VARIANCE_ANSWER


def test_naive_bayes_refuses_a_training_set_missing_a_class():
    with pytest.raises(ValueError, match="every class"):
        SharedVarianceGaussianNB(num_classes=3).fit(CRAFTED_X, CRAFTED_Y)


# ----------------------------------------------------------------------------------------------- the sweep
def _bank(num_train=300, num_test=60, dim=5, num_classes=4, seed=0, rare_class_count=None) -> FeatureBank:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, num_train)
    if rare_class_count is not None:  # class 0 only rare_class_count times
        labels[labels == 0] = 1
        labels[rng.choice(num_train, rare_class_count, replace=False)] = 0
    test_labels = np.arange(num_test) % num_classes
    centers = rng.normal(size=(num_classes, dim)) * 3
    train = (centers[labels] + rng.normal(size=(num_train, dim)) * np.arange(1, dim + 1)).astype(np.float32)
    test = (centers[test_labels] + rng.normal(size=(num_test, dim)) * 2 + 10).astype(np.float32)  # shifted range
    return FeatureBank(train, labels, test, test_labels, {"num_classes": num_classes})


class _Spy:
    """Records what each classifier is fitted on and asked to predict, then delegates."""

    calls: list = []

    def __init__(self, name, inner):
        self.name, self.inner = name, inner

    def fit(self, X, y):
        _Spy.calls.append((self.name, "fit", X.copy(), y.copy()))
        self.inner.fit(X, y)
        return self

    def predict(self, X):
        _Spy.calls.append((self.name, "predict", X.copy(), None))
        return self.inner.predict(X)


def _spied_sweep(bank, sizes, repeats=2):
    _Spy.calls = []
    classifiers = {name: (lambda name=name, make=make: _Spy(name, make()))
                   for name, make in paper_classifiers(bank.num_classes).items()}
    return sample_size_sweep(bank, classifiers, sizes, repeats, seed=0, scaling="minmax", log=lambda _: None)


def test_naive_bayes_and_logistic_regression_get_the_same_subsamples():
    result = _spied_sweep(_bank(), sizes=(20, 60))
    fits = [c for c in _Spy.calls if c[1] == "fit"]
    assert [c[0] for c in fits] == ["naive_bayes", "logistic_regression"] * 4
    for nb_call, lr_call in zip(fits[::2], fits[1::2]):
        np.testing.assert_array_equal(nb_call[2], lr_call[2])
        np.testing.assert_array_equal(nb_call[3], lr_call[3])
    distinct = {c[2].tobytes() for c in fits}
    assert len(distinct) == 4  # each (m, repeat) its own subsample
    for m in (20, 60):
        digests = {r["classifier"]: [x["subsample"] for x in result.records
                                     if x["m"] == m and x["classifier"] == r["classifier"]] for r in result.records}
        assert digests["naive_bayes"] == digests["logistic_regression"]


def test_minmax_scaling_uses_the_training_subsample_only():
    bank = _bank()
    _spied_sweep(bank, sizes=(30,), repeats=1)
    (_, _, fit_x, fit_y), (_, _, predict_x, _) = [c for c in _Spy.calls if c[0] == "naive_bayes"]
    np.testing.assert_allclose(fit_x.min(0), 0.0)
    np.testing.assert_allclose(fit_x.max(0), 1.0)
    # recover the subsample: the rows of the bank whose scaled values are the fitted ones
    indices = draw_subsample(bank.train_labels, 30, 4, np.random.default_rng([0, 30, 0]))
    raw = bank.train_features[indices].astype(np.float64)
    low, high = raw.min(0), raw.max(0)
    np.testing.assert_allclose(fit_x, (raw - low) / (high - low), rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(predict_x, (bank.test_features - low) / (high - low), rtol=1e-6, atol=1e-12)
    assert predict_x.max() > 1.0  # the test features are shifted: scaled with the subsample's range, not their own
    # the full training set's range would give other values
    full_low = bank.train_features.min(0)
    assert not np.allclose(low, full_low)


def test_every_class_appears_in_every_subsample_even_a_rare_one():
    bank = _bank(num_train=400, num_classes=5, rare_class_count=3)
    for repeat in range(30):
        indices = draw_subsample(bank.train_labels, 12, 5, np.random.default_rng([1, 12, repeat]))
        assert len(indices) == len(set(indices)) == 12
        assert set(bank.train_labels[indices]) == set(range(5))
    with pytest.raises(ValueError, match="cannot hold"):
        draw_subsample(bank.train_labels, 4, 5, np.random.default_rng(0))
    assert len(draw_subsample(bank.train_labels, 10_000, 5, np.random.default_rng(0))) == 400  # m >= N: all


def test_claim_check_reads_the_paired_differences():
    records = []
    for m, (nb, lr) in {10: (0.30, 0.40), 100: (0.20, 0.18), 1000: (0.10, 0.05)}.items():
        for repeat in range(3):
            records += [{"m": m, "repeat": repeat, "classifier": "naive_bayes", "error": nb + 0.01 * repeat},
                        {"m": m, "repeat": repeat, "classifier": "logistic_regression", "error": lr + 0.01 * repeat}]
    result = SweepResult(records, {"sizes": [10, 100, 1000], "classifiers": ["naive_bayes", "logistic_regression"]})
    claim = claim_check(result)
    assert claim["crossover_m"] == 100 and claim["holds"] and claim["nb_wins_at_smallest_m"]
    assert [round(r["lr_minus_nb"], 6) for r in claim["paired_differences"]] == [0.1, -0.02, -0.05]
    # NB: 0.31, 0.21, 0.11 (never within a point of its own 0.11 before m = 1000); LR: 0.41, 0.19, 0.06
    assert claim["samples_to_asymptote"] == {"naive_bayes": 1000, "logistic_regression": 1000}
    assert not claim["nb_converges_faster"]
    assert claim_check(result, tolerance=0.15)["samples_to_asymptote"] == {"naive_bayes": 100,
                                                                           "logistic_regression": 100}


def test_study_on_digits_writes_the_table_the_curve_and_the_claim(tmp_path):
    report = run_study(digits_pixel_bank(), sizes=(20, 100, 5000), repeats=2, out=tmp_path / "digits")
    saved = json.loads((tmp_path / "digits.json").read_text())
    assert saved["config"]["sizes"] == [20, 100, 1257]  # capped at the training set
    assert {"claim", "summary", "records"} <= set(saved) and (tmp_path / "digits.png").stat().st_size > 0
    full = [r for r in report["records"] if r["m"] == 1257 and r["classifier"] == "naive_bayes"]
    assert full[0]["error"] == full[1]["error"]  # the whole training set: every repeat the same
    assert "LR − NB" in (tmp_path / "digits.md").read_text()


# ------------------------------------------------------------------------------------ the Lightning experiment
def test_the_experiment_fits_both_arms_on_the_sweeps_subsample(tmp_path):
    """``experiments/gen_vs_dis_nb_digits.yaml`` at m = 100, repeat 0: its naive Bayes is the study's on the same
    subsample (same test error), and its SGD logistic regression trains (a real arm, not a constant)."""
    from pathlib import Path

    from zoo.core.cli import ZooCLI

    config = Path(__file__).resolve().parents[1] / "experiments" / "gen_vs_dis_nb_digits.yaml"
    cli = ZooCLI(args=["--config", str(config), f"--run.root={tmp_path}", "--trainer.logger=false",
                       "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"], run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    metrics = cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    sweep = run_study(digits_pixel_bank(), sizes=(100,), repeats=1)
    nb_error = next(r["error"] for r in sweep["records"] if r["classifier"] == "naive_bayes")
    assert 1 - metrics["val/nb_acc"] == pytest.approx(nb_error, abs=1e-6)
    assert metrics["val/lr_acc"] > 0.8  # 10 classes: chance is 0.1
    assert len(cli.datamodule.indices) == 100 and set(cli.datamodule.train_set.labels.tolist()) == set(range(10))


def test_an_unknown_feature_source_is_a_clear_error():
    from zoo.gen_vs_dis_nb.data import load_bank_source

    with pytest.raises(ValueError, match="unknown feature source 'pixel'"):
        load_bank_source("pixel", "digits")
    with pytest.raises(ValueError, match="dataset must be 'digits'"):
        load_bank_source("pixels", "cifar10_subset")
