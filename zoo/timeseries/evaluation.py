"""Downstream evaluation of time-series representations, as COMET reports it (``tasks/linear_evaluation.py``,
``tasks/fine_tuning.py``): accuracy, macro-F1 and macro one-vs-rest AUROC from class probabilities (scikit-learn),
and the partial fine-tuning protocol, a logistic regression on standardised frozen features
(``tasks/_eval_protocols.py::fit_lr``)."""
from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score
from sklearn.multiclass import OneVsRestClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

__all__ = ["classification_metrics", "linear_probe"]


def classification_metrics(probabilities: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """``accuracy``, ``f1`` (macro) and ``auroc`` (macro one-vs-rest; the positive class's score for two classes,
    which is the same number) of ``(N, K)`` class probabilities against ``(N,)`` labels."""
    predictions = probabilities.argmax(1)
    num_classes = probabilities.shape[1]
    if num_classes == 2:
        auroc = roc_auc_score(labels, probabilities[:, 1])
    else:
        auroc = roc_auc_score(np.eye(num_classes)[labels], probabilities, average="macro", multi_class="ovr")
    return {"accuracy": accuracy_score(labels, predictions),
            "f1": f1_score(labels, predictions, average="macro", labels=np.arange(num_classes)),
            "auroc": float(auroc)}


def linear_probe(train_features: np.ndarray, train_labels: np.ndarray, test_features: np.ndarray,
                 test_labels: np.ndarray, num_classes: int) -> dict[str, float]:
    """COMET's ``fit_lr``: standardise, then one-vs-rest logistic regression (``random_state=0``), scored on the
    test features. The probabilities cover all ``num_classes`` (a class absent from the labelled subset gets 0)."""
    classifier = make_pipeline(StandardScaler(), OneVsRestClassifier(LogisticRegression(random_state=0,
                                                                                       max_iter=10_000)))
    classifier.fit(train_features, train_labels)
    probabilities = np.zeros((len(test_features), num_classes))
    probabilities[:, classifier.classes_] = classifier.predict_proba(test_features)
    return classification_metrics(probabilities, test_labels)
