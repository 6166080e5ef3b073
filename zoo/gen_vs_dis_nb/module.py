"""Both arms of the paper at one training-set size m, as a Lightning run (``experiments/gen_vs_dis_nb_*.yaml``).

On the data module's m-sample subsample (min-max scaled with its own range):
- the generative arm, the shared-variance Gaussian naive Bayes, is closed form: it is fitted once when training
  starts (buffers ``nb_means``, ``nb_shared_variance``, ``nb_log_prior``) and has nothing to optimise;
- the discriminative arm is the official code's SGD logistic regression (``main_train_offline.py --model lr_sgd``,
  ``models/logistic.py::MulticlassLogisticRegressionModel``): one linear layer, weights N(0, 0.01^2) and zero bias,
  cross-entropy, SGD with momentum 0.9 and no weight decay, the learning rate divided by 10 at 60 % and 80 % of
  training (the official schedule drops at epochs 60 and 80 of 100).

Validation logs the test accuracy of both, ``val/nb_acc`` and ``val/lr_acc`` (error = 1 - accuracy). The official
``lr_sgd`` takes the best test error over its evaluations; here every evaluation is logged and the card reports the
last. The study over m and repeats, with the official L-BFGS logistic regression, is
``python -m zoo.gen_vs_dis_nb.study``.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from zoo.core.metrics import accuracy
from zoo.core.module import ZooModule

from .naive_bayes import SharedVarianceGaussianNB

__all__ = ["NaiveBayesVsLogisticRegression"]


class NaiveBayesVsLogisticRegression(ZooModule):
    """Args:
        num_features, num_classes: the bank's feature width and classes (checked against the data).
        var_epsilon: added to every class variance before pooling (official 1e-9).
        lr: SGD learning rate of the logistic regression (official 30, for unscaled features; see the experiment).
        momentum: official 0.9.
        lr_drops: fractions of training after which the learning rate is divided by 10.
    """

    expected_metrics = ("val/nb_acc", "val/lr_acc")

    def __init__(self, num_features: int, num_classes: int, var_epsilon: float = 1e-9, lr: float = 30.0,
                 momentum: float = 0.9, lr_drops: tuple[float, ...] = (0.6, 0.8), **base):
        logistic = nn.Linear(num_features, num_classes)
        nn.init.normal_(logistic.weight, std=0.01)
        nn.init.zeros_(logistic.bias)
        base = {"optimizer": "sgd", "weight_decay": 0.0, "nesterov": False, "ema_decay": None, **base}
        super().__init__(logistic, lr=lr, momentum=momentum, **base)
        self.num_features, self.num_classes, self.var_epsilon = num_features, num_classes, var_epsilon
        self.lr_drops = tuple(lr_drops)
        self.register_buffer("nb_means", torch.zeros(num_classes, num_features, dtype=torch.float64))
        self.register_buffer("nb_shared_variance", torch.ones(num_features, dtype=torch.float64))
        self.register_buffer("nb_log_prior", torch.zeros(num_classes, dtype=torch.float64))

    # ------------------------------------------------------------------------------ the generative arm
    def on_fit_start(self) -> None:
        data = self.trainer.datamodule
        if (data.num_features, data.num_classes) != (self.num_features, self.num_classes):
            raise ValueError(f"the model is set for {self.num_features} features and {self.num_classes} classes; the "
                             f"data has {data.num_features} and {data.num_classes} (set model.init_args.num_features/"
                             "num_classes)")
        train = data.train_set
        nb = SharedVarianceGaussianNB(self.num_classes, self.var_epsilon).fit(train.features.numpy(),
                                                                              train.labels.numpy())
        self.nb_means.copy_(torch.from_numpy(nb.means_))
        self.nb_shared_variance.copy_(torch.from_numpy(nb.shared_variance_))
        self.nb_log_prior.copy_(torch.from_numpy(nb.class_prior_).log())

    def naive_bayes_log_likelihood(self, x: torch.Tensor) -> torch.Tensor:
        """``log pi_k - 1/2 sum_d (x_d - mu_kd)^2 / v_d``, as ``SharedVarianceGaussianNB.joint_log_likelihood``."""
        squared = ((x.double()[:, None, :] - self.nb_means[None]) ** 2 / self.nb_shared_variance).sum(-1)
        return self.nb_log_prior[None] - 0.5 * squared

    # --------------------------------------------------------------------------- the discriminative arm
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = F.cross_entropy(self.network(batch["features"]), batch["label"])
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.network.parameters(), lr=self.lr, momentum=self.momentum,
                                    weight_decay=self.weight_decay)
        total = int(self.trainer.estimated_stepping_batches)
        drops = sorted({max(1, int(total * f)) for f in self.lr_drops})
        schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=drops, gamma=0.1)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # ------------------------------------------------------------------------------------ evaluation
    def setup(self, stage: str) -> None:
        if not hasattr(self, "val_nb_acc"):
            self.val_nb_acc, self.val_lr_acc = accuracy(self.num_classes), accuracy(self.num_classes)

    def validation_step(self, batch: dict, batch_idx: int) -> dict:
        x, y = batch["features"], batch["label"]
        self.val_nb_acc(self.naive_bayes_log_likelihood(x).argmax(1), y)
        self.val_lr_acc(self.network(x).argmax(1), y)
        self.log("val/nb_acc", self.val_nb_acc, on_epoch=True, prog_bar=True)
        self.log("val/lr_acc", self.val_lr_acc, on_epoch=True, prog_bar=True)
