"""``python -m zoo.gen_vs_dis_nb.study``: naive Bayes vs logistic regression against the number of training samples.

The paper's sweep (``main_train_offline.py --minmax`` with ``--model nb_diag`` and ``--model lr_bgfs``) on a frozen
feature bank of the ssl family:

    python -m zoo.gen_vs_dis_nb.study --digits-pixels                                   # scikit-learn digits, raw
    python -m zoo.gen_vs_dis_nb.study --random-init experiments/simclr_cifar10_subset.yaml --dataset cifar10_subset
    python -m zoo.gen_vs_dis_nb.study --checkpoint runs/simclr_cifar10_subset/checkpoints/last.ckpt

For each m and each of ``--repeats`` (5) subsamples: m training samples drawn uniformly and redrawn until every class
appears, min-max scaled to [0, 1] with the subsample's own minima and maxima (the test features with the same
scaler), then the shared-variance naive Bayes and scikit-learn's ``LogisticRegression(lbfgs, C=1, max_iter=1000)``
both fit on that same subsample (``zoo.ssl.bank.sample_size_sweep``). The official code draws NB's and LR's
subsamples in two separate runs; drawing one per (m, repeat) for both makes the comparison paired, which is what
the claim check uses (:func:`claim_check`): how many samples each needs to reach its own asymptotic error (the
theorem's quantity), and per m the mean and t-interval of LR error minus NB error with the crossover (the few-shot
claim). Writes ``<out>.json`` / ``.md`` / ``.png``.
"""
from __future__ import annotations

import argparse
import json
import math
import time
import warnings
from pathlib import Path

import numpy as np

from zoo.ssl.bank import (FeatureBank, SweepResult, add_source_arguments, bank_from_args, sample_size_sweep,
                          source_name, sweep_markdown, write_sweep_report)

from .naive_bayes import SharedVarianceGaussianNB

__all__ = ["digits_pixel_bank", "paper_classifiers", "run_study", "claim_check", "samples_to_asymptote",
           "within_class_correlation", "main", "PAPER_SIZES"]

# main_train_offline.py's m grid for CIFAR-10 (its 50,000 is the whole training set); capped at the bank's size
PAPER_SIZES = (20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 30000, 50000)


def digits_pixel_bank() -> FeatureBank:
    """scikit-learn's 8x8 digits as 64 raw pixel values (0..16), split as the zoo's ``digits`` image set
    (stratified 70/30, ``random_state=0``): the catalog's CPU stand-in, no encoder involved."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(digits.data.astype(np.float32), digits.target, test_size=0.3,
                                              stratify=digits.target, random_state=0)
    meta = {"dataset": "digits", "layer": "pixels", "source": {"kind": "pixels", "name": "sklearn digits 8x8"},
            "num_classes": 10, "dim": 64, "num_train": len(y_tr), "num_test": len(y_te)}
    return FeatureBank(x_tr, y_tr.astype(np.int64), x_te, y_te.astype(np.int64), meta)


class _LogisticRegression:
    """The official ``lr_bgfs`` model; lbfgs's "failed to converge" warning (1000 iterations not always enough on
    the raw features) is counted in ``converged`` instead of flooding the output."""

    def __init__(self, C: float = 1.0, max_iter: int = 1000):
        from sklearn.linear_model import LogisticRegression

        self.model = LogisticRegression(penalty="l2", C=C, solver="lbfgs", max_iter=max_iter)

    def fit(self, X, y):
        from sklearn.exceptions import ConvergenceWarning

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            self.model.fit(X, y)
        self.converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
        return self

    def predict(self, X):
        return self.model.predict(X)


def paper_classifiers(num_classes: int, C: float = 1.0, var_epsilon: float = 1e-9, with_lda: bool = False) -> dict:
    """NB and LR as the paper runs them; ``with_lda`` adds the same generative model without the naive assumption (a
    full covariance shared by the classes: linear discriminant analysis, Ledoit-Wolf shrinkage so that it exists for
    m < d), the evidence for whether the independence assumption is what costs NB its asymptotic error."""
    classifiers = {"naive_bayes": lambda: SharedVarianceGaussianNB(num_classes, var_epsilon),
                   "logistic_regression": lambda: _LogisticRegression(C)}
    if with_lda:
        from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

        classifiers["lda_shrinkage"] = lambda: LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto")
    return classifiers


def within_class_correlation(bank: FeatureBank) -> float:
    """Mean absolute off-diagonal correlation between features within a class (averaged over classes, features
    constant within a class left out): 0 when the naive Bayes assumption holds."""
    values = []
    for k in range(bank.num_classes):
        x = bank.train_features[bank.train_labels == k].astype(np.float64)
        x = x[:, x.std(0) > 0]
        if x.shape[1] < 2 or len(x) < 3:
            continue
        corr = np.corrcoef(x, rowvar=False)
        values.append(np.abs(corr[~np.eye(len(corr), dtype=bool)]).mean())
    return float(np.mean(values))


def samples_to_asymptote(result: SweepResult, classifier: str, tolerance: float = 0.01) -> int | None:
    """The smallest m from which ``classifier``'s mean error stays within ``tolerance`` (absolute) of its mean error
    at the largest m: how fast it approaches its own asymptotic error, the quantity of the paper's theorem
    (O(log n) samples for naive Bayes, O(n) for logistic regression, n the feature dimension)."""
    sizes = result.config["sizes"]
    means = [float(result.errors(classifier, m).mean()) for m in sizes]
    for i, m in enumerate(sizes):
        if all(abs(e - means[-1]) <= tolerance for e in means[i:]):
            return m
    return None


def claim_check(result: SweepResult, confidence: float = 0.95, tolerance: float = 0.01) -> dict:
    """The paper's two empirical claims, on paired subsamples:

    - convergence: the m each classifier needs to come within ``tolerance`` of its own error at the largest m
      (:func:`samples_to_asymptote`); the claim is NB's is smaller;
    - few samples: per m, the paired difference LR error - NB error (positive: NB better) with its t-interval, and
      the crossover, the smallest m from which LR's mean error stays lower; the claim is NB is better at the smallest
      m (beyond the interval)."""
    from scipy import stats

    rows = []
    for m in result.config["sizes"]:
        nb = {r["repeat"]: r["error"] for r in result.records if r["m"] == m and r["classifier"] == "naive_bayes"}
        lr = {r["repeat"]: r["error"] for r in result.records if r["m"] == m
              and r["classifier"] == "logistic_regression"}
        diff = np.array([lr[k] - nb[k] for k in sorted(nb)])
        n = len(diff)
        half = float(stats.t.ppf(0.5 + confidence / 2, n - 1) * diff.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0
        rows.append({"m": m, "lr_minus_nb": float(diff.mean()), "ci_half_width": half,
                     "nb_better_beyond_ci": bool(diff.mean() - half > 0),
                     "lr_better_beyond_ci": bool(diff.mean() + half < 0)})
    crossover = None
    for i, row in enumerate(rows):
        if all(r["lr_minus_nb"] < 0 for r in rows[i:]):
            crossover = row["m"]
            break
    smallest = rows[0] if rows else None
    to_asymptote = {name: samples_to_asymptote(result, name, tolerance) for name in ("naive_bayes",
                                                                                     "logistic_regression")}
    asymptote = {name: float(result.errors(name, result.config["sizes"][-1]).mean()) for name in to_asymptote}
    return {"paired_differences": rows, "crossover_m": crossover,
            "nb_wins_at_smallest_m": bool(smallest and smallest["lr_minus_nb"] > 0),
            "holds": bool(smallest and smallest["nb_better_beyond_ci"]),
            "tolerance": tolerance, "samples_to_asymptote": to_asymptote, "error_at_largest_m": asymptote,
            "nb_converges_faster": bool(to_asymptote["naive_bayes"] is not None and (
                to_asymptote["logistic_regression"] is None
                or to_asymptote["naive_bayes"] < to_asymptote["logistic_regression"]))}


def claim_markdown(claim: dict) -> str:
    lines = ["| m | LR − NB error (points), mean ± 95% CI | NB better beyond CI |", "|---|---|---|"]
    for row in claim["paired_differences"]:
        lines.append(f"| {row['m']} | {100 * row['lr_minus_nb']:+.2f} ± {100 * row['ci_half_width']:.2f} | "
                     f"{'yes' if row['nb_better_beyond_ci'] else 'no'} |")
    steps, floor, tol = claim["samples_to_asymptote"], claim["error_at_largest_m"], 100 * claim["tolerance"]
    lines += ["", f"Convergence: NB comes within {tol:.0f} point of its largest-m error "
              f"({100 * floor['naive_bayes']:.2f} %) from m = {steps['naive_bayes']}, LR within {tol:.0f} point of its own "
              f"({100 * floor['logistic_regression']:.2f} %) from m = {steps['logistic_regression']}: NB converges "
              f"{'faster' if claim['nb_converges_faster'] else 'not faster'}.",
              f"Few samples: crossover (smallest m from which LR's mean error stays lower) m = {claim['crossover_m']}; "
              f"NB better at the smallest m beyond the CI: {'yes' if claim['holds'] else 'no'} (mean difference "
              f"{'in favour of NB' if claim['nb_wins_at_smallest_m'] else 'in favour of LR'})."]
    return "\n".join(lines) + "\n"


def run_study(bank: FeatureBank, sizes=PAPER_SIZES, repeats: int = 5, seed: int = 0, C: float = 1.0,
              out: str | Path | None = None, title: str = "", with_lda: bool = False) -> dict:
    start = time.perf_counter()
    result = sample_size_sweep(bank, paper_classifiers(bank.num_classes, C, with_lda=with_lda), sizes, repeats,
                               seed, scaling="minmax")
    claim = claim_check(result)
    seconds = time.perf_counter() - start
    diagnostics = {"within_class_abs_correlation": within_class_correlation(bank), "dim": bank.dim}
    report = {**result.to_json(), "claim": claim, "diagnostics": diagnostics, "wall_seconds": round(seconds, 1)}
    if out is not None:
        paths = write_sweep_report(result, out, title)
        paths["json"].write_text(json.dumps(report, indent=1))
        paths["md"].write_text(sweep_markdown(result, title) + "\n" + claim_markdown(claim)
                               + f"\nFeatures: dimension {bank.dim}, mean |within-class correlation| "
                               f"{diagnostics['within_class_abs_correlation']:.3f}. Wall time: {seconds:.1f} s.\n")
        report["paths"] = {k: str(v) for k, v in paths.items()}
    return report


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Naive Bayes vs logistic regression against training-set size "
                                                 "on frozen features (Zheng et al., ICML 2023).")
    source = add_source_arguments(parser)
    source.add_argument("--digits-pixels", action="store_true", help="scikit-learn digits, 64 raw pixels")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(PAPER_SIZES),
                        help="training-set sizes m (capped at the training set; default: the paper's CIFAR-10 grid)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sweep-seed", type=int, default=0, help="seed of the subsample draws")
    parser.add_argument("--C", type=float, default=1.0)
    parser.add_argument("--with-lda", action="store_true", help="also the full-covariance generative classifier")
    parser.add_argument("--out", default=None, help="output prefix (default runs/gen_vs_dis_nb/<source>)")
    args = parser.parse_args(argv)

    if args.digits_pixels:
        bank, name = digits_pixel_bank(), "digits_pixels"
    else:
        bank = bank_from_args(args)
        name = f"{source_name(args)}_{args.dataset}_{args.layer}"
    out = Path(args.out or f"runs/gen_vs_dis_nb/{name}")
    report = run_study(bank, args.sizes, args.repeats, args.sweep_seed, args.C, out,
                       title=f"NB vs LR, {name} (dim {bank.dim})", with_lda=args.with_lda)
    print(Path(report["paths"]["md"]).read_text())
    print("wrote " + ", ".join(report["paths"].values()))


if __name__ == "__main__":
    main()
