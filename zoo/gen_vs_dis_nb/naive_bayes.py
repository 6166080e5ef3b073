"""The paper's generative linear classifier: Gaussian naive Bayes with one diagonal variance shared by all classes.

Zheng et al., *Revisiting Discriminative vs. Generative Classifiers: Theory and Implications*, ICML 2023; official
code ``ML-GSAI/Revisiting-Dis-vs-Gen-Classifiers``, ``models/gaussnb.py::GaussianNB``.

    mu_k   = mean of the class-k samples                              (per class, per feature)
    s2_k   = population variance of the class-k samples + 1e-9         (per class, per feature)
    pi_k   = n_k / n                                                   (class priors)
    v      = sum_k pi_k s2_k                                           (ONE variance per feature, pooled by the priors)
    y_hat  = argmax_k  log pi_k - 1/2 sum_d (x_d - mu_kd)^2 / v_d

The shared variance is what makes this naive Bayes a *linear* classifier, the model the paper's sample-complexity
analysis is about (the x^2/v term is the same for every class and cancels in the argmax). With a variance per class
(scikit-learn's ``GaussianNB``) the decision boundary is quadratic: a different model, with a different sample
complexity. The ``log(2 pi v)`` normaliser is dropped as the official ``predict`` drops it (it is the same for all
classes).
"""
from __future__ import annotations

import numpy as np

__all__ = ["SharedVarianceGaussianNB"]


class SharedVarianceGaussianNB:
    """``fit(X, y)`` / ``predict(X)`` / ``score(X, y)`` like a scikit-learn classifier, in float64.

    Classes are ``0 .. num_classes - 1`` and every one must appear in the training set: the official code counts the
    classes it sees and would silently shift the label indices of a missing class (its sweep redraws subsamples
    until every class appears; see ``zoo.ssl.bank.draw_subsample``)."""

    def __init__(self, num_classes: int | None = None, var_epsilon: float = 1e-9):
        self.num_classes, self.var_epsilon = num_classes, var_epsilon

    def fit(self, X: np.ndarray, y: np.ndarray) -> "SharedVarianceGaussianNB":
        X, y = np.asarray(X, np.float64), np.asarray(y)
        if X.ndim != 2 or len(X) != len(y):
            raise ValueError(f"expected X of shape (n, d) and y of shape (n,), got {X.shape} and {y.shape}")
        num_classes = self.num_classes if self.num_classes is not None else int(y.max()) + 1
        counts = np.bincount(y, minlength=num_classes)
        if len(counts) > num_classes or (counts == 0).any():
            raise ValueError(f"every class 0..{num_classes - 1} must appear in the training set; counts: "
                             f"{counts.tolist()}")
        self.num_classes_ = num_classes
        self.class_count_ = counts
        self.class_prior_ = counts / counts.sum()
        self.means_ = np.stack([X[y == k].mean(0) for k in range(num_classes)])
        self.class_variances_ = np.stack([X[y == k].var(0) for k in range(num_classes)]) + self.var_epsilon
        self.shared_variance_ = self.class_prior_ @ self.class_variances_
        return self

    def joint_log_likelihood(self, X: np.ndarray) -> np.ndarray:
        """``log pi_k - 1/2 sum_d (x_d - mu_kd)^2 / v_d`` for every sample and class, shape ``(n, K)``."""
        X = np.asarray(X, np.float64)
        inv_var = 1.0 / self.shared_variance_
        # the squared distance expanded, so no (n, K, d) tensor is built: |x|^2_v - 2 <x, mu_k>_v + |mu_k|^2_v
        squared = ((X ** 2) @ inv_var)[:, None] - 2.0 * (X * inv_var) @ self.means_.T \
            + ((self.means_ ** 2) @ inv_var)[None, :]
        return np.log(self.class_prior_)[None, :] - 0.5 * squared

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.joint_log_likelihood(X).argmax(1)

    def score(self, X: np.ndarray, y: np.ndarray) -> float:
        return float((self.predict(X) == np.asarray(y)).mean())
