"""Continual-learning evaluation: the task matrix, its summaries, frozen-feature probes, and anneal-on-a-copy.

After training task ``i``, every task ``j <= i`` seen so far is evaluated: ``R[i][j]`` (a probe's accuracy on task
``j``'s held-out images; the method's loss there in ``L[i][j]``). Summaries (Chaudhry et al., 2018):

    average accuracy  A_i = mean_{j <= i} R[i][j]
    forgetting        F_i = mean_{j < i} max_{l in [j, i-1]} (R[l][j] - R[i][j])      (F_0 = 0)

Anneal-on-a-copy (the infinite schedule of Ibrahim et al., 2024): before a model is evaluated or released, a copy
of the network and its optimiser state trains ``anneal_steps`` more steps on the current task with the learning rate
decayed exponentially, eta_k = eta_const * (eta_min / eta_const)^(k / (K - 1)); the copy is evaluated and thrown
away, and training goes on from the constant phase with the original weights and optimiser state untouched.

A module evaluated by :class:`TaskMatrix` provides ``network`` (what the optimiser trains), ``objective(network,
batch) -> loss`` and ``features(network, images) -> (N, D)``; its data module is a
:class:`~zoo.continual.data.TaskStreamDataModule` (or has its ``task_loader`` / ``anneal_batches`` / ``is_task_end``).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Callable, Iterable, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from lightning.pytorch import Callback
from lightning.pytorch.utilities import move_data_to_device

from zoo.core.callbacks import random_states, set_random_states

__all__ = ["TaskMatrix", "anneal_copy", "average_accuracy", "forgetting", "knn_accuracy", "linear_probe_accuracy"]


# ---------------------------------------------------------------------------------------------- summaries
def average_accuracy(matrix: list[list[float]], after: int | None = None) -> float:
    """A_i: the mean of row ``after`` (default: the last) over the tasks seen then."""
    i = len(matrix) - 1 if after is None else after
    return sum(matrix[i][: i + 1]) / (i + 1)


def forgetting(matrix: list[list[float]], after: int | None = None) -> float:
    """F_i: per earlier task, its best accuracy before task ``i`` minus its accuracy after task ``i``, averaged."""
    i = len(matrix) - 1 if after is None else after
    if i == 0:
        return 0.0
    return sum(max(matrix[l][j] for l in range(j, i)) - matrix[i][j] for j in range(i)) / i


# ---------------------------------------------------------------------------------------------- probes
def linear_probe_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
                          test_y: torch.Tensor, max_iter: int = 1000) -> float:
    """Multinomial logistic regression (L-BFGS, L2 with C=1) on standardised frozen features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train_x.double().numpy())
    probe = LogisticRegression(max_iter=max_iter).fit(scaler.transform(train_x.double().numpy()), train_y.numpy())
    return float((probe.predict(scaler.transform(test_x.double().numpy())) == test_y.numpy()).mean())


def knn_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 k: int = 20, temperature: float = 0.07) -> float:
    """Weighted cosine k-NN (Wu et al., 2018): each of the ``k`` nearest training features votes for its class with
    weight exp(cos / temperature)."""
    similarity = F.normalize(test_x.float(), dim=1) @ F.normalize(train_x.float(), dim=1).T
    top, index = similarity.topk(min(k, len(train_x)), dim=1)
    classes = int(max(train_y.max(), test_y.max())) + 1
    votes = torch.zeros(len(test_x), classes).scatter_add_(1, train_y[index], (top / temperature).exp())
    return float((votes.argmax(1) == test_y).float().mean())


# ---------------------------------------------------------------------------------------------- anneal on a copy
def anneal_copy(network: nn.Module, optimizer: torch.optim.Optimizer, batches: Iterable,
                objective: Callable[[nn.Module, dict], torch.Tensor], min_lr_ratio: float,
                steps: int) -> nn.Module:
    """A deep copy of ``network`` trained ``steps`` more steps on ``batches`` by a copy of ``optimizer`` (its
    state included), each group's learning rate decayed exponentially from its current value to ``min_lr_ratio``
    times its base (``initial_lr``). ``network`` and ``optimizer`` are left exactly as they were."""
    twin = copy.deepcopy(network)
    twin_of = {id(p): q for p, q in zip(network.parameters(), twin.parameters())}
    groups = []
    for group in optimizer.param_groups:
        if any(id(p) not in twin_of for p in group["params"]):
            raise ValueError("anneal_copy: the optimiser trains parameters outside `network`; the copy would miss "
                             "them (keep every trained parameter inside the module's `network`)")
        groups.append({**{k: v for k, v in group.items() if k != "params"},
                       "params": [twin_of[id(p)] for p in group["params"]]})
    twin_optimizer = type(optimizer)(groups)
    # load_state_dict would share the state tensors (Adam's moments) with the original: copy them first
    twin_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    starts = [g["lr"] for g in twin_optimizer.param_groups]
    ends = [g.get("initial_lr", g["lr"]) * min_lr_ratio for g in twin_optimizer.param_groups]
    twin.train()
    for k, batch in zip(range(steps), batches):
        for group, start, end in zip(twin_optimizer.param_groups, starts, ends):
            group["lr"] = start * (end / start) ** (k / max(1, steps - 1))
        loss = objective(twin, batch)
        twin_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        twin_optimizer.step()
    return twin


# ---------------------------------------------------------------------------------------------- the callback
class TaskMatrix(Callback):
    """At the end of every task, evaluates the model on every task seen so far and extends R (probe accuracy) and
    L (loss); logs ``val/avg_acc``, ``val/forgetting``, ``val/task<j>_acc`` and ``val/task<j>_loss``, and writes
    ``task_matrix.json`` in the run directory.

    Args:
        probe: ``linear`` (logistic regression on frozen features) or ``knn`` (weighted cosine k-NN, ``knn_k``),
            trained on the task's training images, scored on its held-out images (within-task classes).
        anneal_steps: 0 evaluates the training weights as they are (the repeated-cosine baseline ends each task at
            eta_min already); K > 0 evaluates a copy annealed for K steps on the current task (infinite schedule),
            down to the module's ``min_lr_ratio``.
        seed: seeds the evaluation's own random draws (masks, anneal batches); the training ones are handed back.
    """

    def __init__(self, probe: Literal["linear", "knn"] = "linear", anneal_steps: int = 0, knn_k: int = 20,
                 seed: int = 0, filename: str = "task_matrix.json"):
        if probe not in ("linear", "knn"):
            raise ValueError(f"probe must be 'linear' or 'knn', got {probe!r}")
        if anneal_steps < 0:
            raise ValueError(f"anneal_steps must be >= 0, got {anneal_steps}")
        self.probe, self.anneal_steps, self.knn_k, self.seed, self.filename = probe, anneal_steps, knn_k, seed, filename
        self.accuracy: list[list[float]] = []  # R, row i = after task i
        self.loss: list[list[float]] = []  # L

    def state_dict(self) -> dict:
        return {"accuracy": self.accuracy, "loss": self.loss}

    def load_state_dict(self, state: dict) -> None:
        self.accuracy, self.loss = state["accuracy"], state["loss"]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        dm, steps = trainer.datamodule, trainer.global_step
        if not dm.is_task_end(steps) or len(self.accuracy) >= steps // dm.steps_per_task:
            return  # not a task end, or already evaluated (several batches per step under accumulation)
        task = steps // dm.steps_per_task - 1
        training_states = random_states()
        try:
            torch.manual_seed(self.seed * 1_000_003 + task)
            accuracy, loss = self.evaluate(trainer, pl_module, task)
        finally:
            set_random_states(training_states)  # the run's own random draws do not depend on the evaluation
        self.accuracy.append(accuracy)
        self.loss.append(loss)
        metrics = {"val/avg_acc": average_accuracy(self.accuracy), "val/forgetting": forgetting(self.accuracy),
                   **{f"val/task{j}_acc": a for j, a in enumerate(accuracy)},
                   **{f"val/task{j}_loss": v for j, v in enumerate(loss)}}
        for name, value in metrics.items():
            pl_module.log(name, value, on_step=True, on_epoch=False, rank_zero_only=True)
        if trainer.is_global_zero:
            self.save(Path(trainer.default_root_dir) / self.filename)

    def evaluate(self, trainer, pl_module, task: int) -> tuple[list[float], list[float]]:
        dm, device = trainer.datamodule, pl_module.device

        def on_device(batch):
            return dm.on_after_batch_transfer(move_data_to_device(batch, device), 0)

        network = pl_module.network
        if self.anneal_steps:
            batches = (on_device(b) for b in dm.anneal_batches(task, self.anneal_steps, self.seed * 7919 + task))
            with trainer.precision_plugin.forward_context():
                network = anneal_copy(network, trainer.optimizers[0], batches, pl_module.objective,
                                      pl_module.min_lr_ratio, self.anneal_steps)
        was_training = network.training
        network.eval()
        accuracy, loss = [], []
        with torch.no_grad(), trainer.precision_plugin.forward_context():
            for j in range(task + 1):
                train_x, train_y = self._features(pl_module, network, map(on_device, dm.task_loader(j, "train")))
                test_x, test_y, test_loss = [], [], []
                for b in map(on_device, dm.task_loader(j, "test")):
                    test_x.append(pl_module.features(network, b["image"]).float().cpu())
                    test_y.append(b["label"].cpu())
                    test_loss.append(float(pl_module.objective(network, b)) * len(b["label"]))
                test_x, test_y = torch.cat(test_x), torch.cat(test_y)
                accuracy.append(self._probe(train_x, train_y, test_x, test_y))
                loss.append(sum(test_loss) / len(test_y))
        network.train(was_training)
        return accuracy, loss

    @staticmethod
    def _features(pl_module, network, batches) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = zip(*[(pl_module.features(network, b["image"]).float().cpu(), b["label"].cpu()) for b in batches])
        return torch.cat(xs), torch.cat(ys)

    def _probe(self, train_x, train_y, test_x, test_y) -> float:
        if self.probe == "knn":
            return knn_accuracy(train_x, train_y, test_x, test_y, k=self.knn_k)
        return linear_probe_accuracy(train_x, train_y, test_x, test_y)

    def save(self, path: Path) -> None:
        final = len(self.accuracy) - 1
        summary = {"accuracy": self.accuracy, "loss": self.loss, "probe": self.probe,
                   "anneal_steps": self.anneal_steps,
                   "average_accuracy": [average_accuracy(self.accuracy, i) for i in range(final + 1)],
                   "forgetting": [forgetting(self.accuracy, i) for i in range(final + 1)]}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary, indent=1))
