"""Downstream evaluation of a feature matrix: an MLP and gradient-boosted trees (scikit-learn) fitted on the train
rows, scored on held-out rows by accuracy (classification) or RMSE (regression).

The T-JEPA paper trains its downstream models (MLP, ResNet, FT-Transformer, ..., and XGBoost) on the frozen
encoder's representations and on the raw features; here one scikit-learn MLP and one histogram GBDT play those
roles, with scikit-learn's defaults, so the same call compares any two feature matrices.
"""
from __future__ import annotations

from typing import Callable

import lightning as L
import numpy as np
import torch
from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor
from sklearn.metrics import accuracy_score, mean_squared_error
from sklearn.neural_network import MLPClassifier, MLPRegressor

__all__ = ["DownstreamProbe", "downstream_models", "downstream_scores", "metric_name"]


def metric_name(task: str) -> str:
    return "acc" if task == "classification" else "rmse"


def downstream_models(task: str, seed: int, mlp_hidden: tuple[int, ...] = (256, 256), mlp_max_iter: int = 200,
                      gbdt_max_iter: int = 100) -> dict:
    """The two downstream models, unfitted: an MLP (Adam, early stopping on 10% of the train rows) and a histogram
    GBDT (scikit-learn defaults: 100 trees, lr 0.1)."""
    classification = task == "classification"
    mlp = (MLPClassifier if classification else MLPRegressor)(
        hidden_layer_sizes=mlp_hidden, max_iter=mlp_max_iter, early_stopping=True, random_state=seed)
    gbdt = (HistGradientBoostingClassifier if classification else HistGradientBoostingRegressor)(
        max_iter=gbdt_max_iter, random_state=seed)
    return {"mlp": mlp, "gbdt": gbdt}


def downstream_scores(x_train: np.ndarray, y_train: np.ndarray, x_eval: np.ndarray, y_eval: np.ndarray, task: str,
                      seed: int = 0, models: tuple[str, ...] = ("mlp", "gbdt"), **model_kwargs) -> dict[str, float]:
    """``{"mlp_acc": ..., "gbdt_acc": ...}`` (``*_rmse`` for regression) of each model fitted on the train rows."""
    scores = {}
    for name, model in downstream_models(task, seed, **model_kwargs).items():
        if name not in models:
            continue
        prediction = model.fit(x_train, y_train).predict(x_eval)
        score = (accuracy_score(y_eval, prediction) if task == "classification"
                 else mean_squared_error(y_eval, prediction) ** 0.5)
        scores[f"{name}_{metric_name(task)}"] = float(score)
    return scores


@torch.no_grad()
def encode_rows(encode: Callable[[torch.Tensor], torch.Tensor], x: np.ndarray, device: torch.device,
                batch_size: int = 1024) -> np.ndarray:
    """``encode`` applied to the rows ``x`` in batches: a (N, F) float32 matrix."""
    out = [encode(torch.from_numpy(x[i:i + batch_size]).to(device)).flatten(1).float().cpu()
           for i in range(0, len(x), batch_size)]
    return torch.cat(out).numpy()


class DownstreamProbe(L.Callback):
    """At the end of each validation, fits the downstream models on the module's frozen representations of the
    table's train rows and scores them on the val rows: logs ``val/<model>_acc`` (``_rmse``). The module gives
    ``representations(x) -> (B, ...)`` and the data module a ``table`` (:class:`~zoo.tabular.data.Table`).

    Args:
        models: which downstream models (``mlp``, ``gbdt``).
        max_train_rows: fit on at most this many train rows (the first ones), to bound the time of a validation.
    """

    def __init__(self, models: tuple[str, ...] = ("mlp", "gbdt"), max_train_rows: int = 20_000):
        self.models, self.max_train_rows = tuple(models), max_train_rows

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        table = trainer.datamodule.table
        mode = pl_module.training
        pl_module.eval()
        x_train = encode_rows(pl_module.representations, table.x_train[: self.max_train_rows], pl_module.device)
        x_val = encode_rows(pl_module.representations, table.x_val, pl_module.device)
        pl_module.train(mode)
        scores = downstream_scores(x_train, table.y_train[: self.max_train_rows], x_val, table.y_val, table.task,
                                   seed=0, models=self.models)
        for name, value in scores.items():
            pl_module.log(f"val/{name}", value, rank_zero_only=True)
