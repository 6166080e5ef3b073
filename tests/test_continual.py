"""The continual family: task streams switch at the right global steps and resume exactly; the matrix summaries on
a hand-made matrix; anneal-on-a-copy leaves the training network and optimiser bit-identical; the task-matrix
callback neither changes training nor depends on where it ran (no official code: checked against hand
computations and the definitions of Chaudhry et al., 2018)."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn as nn

from zoo.continual.data import TaskStreamDataModule, class_splits
from zoo.continual.evaluation import (TaskMatrix, anneal_copy, average_accuracy, forgetting, knn_accuracy,
                                      linear_probe_accuracy)


def trainer_at(step: int, accumulate: int = 1, rank: int = 0, world: int = 1) -> SimpleNamespace:
    return SimpleNamespace(global_rank=rank, world_size=world, global_step=step, accumulate_grad_batches=accumulate,
                           current_epoch=0)


def stream_module(**kwargs) -> TaskStreamDataModule:
    args = dict(dataset="digits", num_tasks=5, steps_per_task=3, batch_size=4, steps_per_epoch=4, num_workers=0)
    dm = TaskStreamDataModule(**{**args, **kwargs})
    dm.trainer = trainer_at(0)
    dm.setup("fit")
    return dm


def steps_from(dm: TaskStreamDataModule, step: int, epochs: int = 2) -> list[list[int]]:
    """The global batches (labels) from global step ``step`` to the end of epoch ``epochs - 1``."""
    batches = []
    while step < epochs * dm.steps_per_epoch:
        dm.trainer = trainer_at(step)
        loader = dm.train_dataloader()
        epoch_batches = [b["label"].tolist() for b in loader]
        batches += epoch_batches
        step += len(epoch_batches)
    return batches


# --------------------------------------------------------------------------------------------- task stream
def test_class_splits_are_disjoint_and_cover_the_classes():
    assert class_splits(10, 5) == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    shuffled = class_splits(10, 2, order_seed=3)
    assert sorted(shuffled[0] + shuffled[1]) == list(range(10)) and shuffled != class_splits(10, 2)
    with pytest.raises(ValueError, match="num_tasks=3 must divide"):
        class_splits(10, 3)


def test_the_stream_switches_task_at_the_right_global_steps():
    dm = stream_module()  # 3 steps per task, 4 steps per epoch: the switches fall inside epochs
    batches = steps_from(dm, 0, epochs=4)
    for step, labels in enumerate(batches):
        task = min(step // 3, 4)
        assert set(labels) <= set(dm.task_classes[task]), (step, labels)
    assert [dm.task_of_step(s) for s in (0, 2, 3, 5, 6, 14, 15, 99)] == [0, 0, 1, 1, 2, 4, 4, 4]
    assert [dm.is_task_end(s) for s in (0, 2, 3, 6, 15, 18)] == [False, False, True, True, True, False]


def test_the_stream_resumes_exactly_inside_a_task_and_across_epochs():
    dm = stream_module()
    straight = steps_from(dm, 0, epochs=3)
    for k in (1, 3, 5, 7):  # mid-task, task start, mid-epoch after a switch, last step of an epoch
        assert steps_from(dm, k, epochs=3) == straight[k:], k


def test_two_processes_split_every_global_batch():
    dm = stream_module()
    dm.trainer = trainer_at(0)
    whole = [b["idx"].tolist() for b in dm.train_dataloader()]
    halves = []
    for rank in (0, 1):
        dm.trainer = trainer_at(0, rank=rank, world=2)
        halves.append([b["idx"].tolist() for b in dm.train_dataloader()])
    for step, batch in enumerate(whole):
        assert sorted(halves[0][step] + halves[1][step]) == sorted(batch)


# --------------------------------------------------------------------------------------------- the matrix
# R[i][j]: after task i, on task j (hand-made; above the diagonal unused)
MATRIX = [[0.90],
          [0.70, 0.80],
          [0.60, 0.85, 0.50]]


def test_average_accuracy_and_forgetting_on_a_hand_made_matrix():
    assert average_accuracy(MATRIX, 0) == pytest.approx(0.90)
    assert average_accuracy(MATRIX, 1) == pytest.approx(0.75)
    assert average_accuracy(MATRIX) == pytest.approx((0.60 + 0.85 + 0.50) / 3)
    assert forgetting(MATRIX, 0) == 0.0
    assert forgetting(MATRIX, 1) == pytest.approx(0.20)  # task 0: 0.90 -> 0.70
    # after task 2: task 0 best before = 0.90 -> 0.60 (0.30); task 1 best before = 0.80 -> 0.85 (-0.05)
    assert forgetting(MATRIX) == pytest.approx((0.30 - 0.05) / 2)


def test_probes_separate_separable_features():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(40) % 2
    x = torch.randn(40, 5, generator=g) * 0.1 + y[:, None].float() * torch.tensor([3.0, 0, 0, 0, 0])
    assert linear_probe_accuracy(x[:20], y[:20], x[20:], y[20:]) == 1.0
    assert knn_accuracy(x[:20] + 0.5, y[:20], x[20:] + 0.5, y[20:], k=5) == 1.0
    assert knn_accuracy(x[:20] + 0.5, 1 - y[:20], x[20:] + 0.5, y[20:], k=5) == 0.0  # it reads the labels


# --------------------------------------------------------------------------------------------- anneal on a copy
def _net_and_adam():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    opt = torch.optim.AdamW([{"params": list(net.parameters()), "lr": 0.1, "initial_lr": 0.2}], weight_decay=0.05)
    for _ in range(2):  # populate Adam's moments and step counts
        opt.zero_grad()
        net(torch.randn(8, 4)).square().mean().backward()
        opt.step()
    return net, opt


def test_anneal_copy_leaves_the_training_weights_and_optimiser_bit_identical():
    net, opt = _net_and_adam()
    weights, state = copy.deepcopy(net.state_dict()), copy.deepcopy(opt.state_dict())
    lrs_seen = []

    def objective(network, batch):
        lrs_seen.append(None)
        return network(batch).square().mean()

    batches = [torch.randn(8, 4) for _ in range(4)]
    twin = anneal_copy(net, opt, batches, objective, min_lr_ratio=0.01, steps=4)
    for name, value in net.state_dict().items():
        assert torch.equal(value, weights[name]), name
    after = opt.state_dict()
    assert after["param_groups"] == state["param_groups"]
    for index, entry in state["state"].items():
        for key, value in entry.items():
            assert torch.equal(after["state"][index][key], value), (index, key)
    assert len(lrs_seen) == 4
    assert any(not torch.equal(p, q) for p, q in zip(twin.parameters(), net.parameters()))  # the copy trained


def test_anneal_copy_decays_exponentially_from_the_current_lr_to_eta_min():
    net, opt = _net_and_adam()
    lrs = []

    class Recorder(torch.optim.AdamW):  # the copy is built with the original's class: record its lr per step
        def step(self, closure=None):
            lrs.append(self.param_groups[0]["lr"])
            return super().step(closure)

    opt.__class__ = Recorder
    anneal_copy(net, opt, [torch.randn(8, 4) for _ in range(5)], lambda n, b: n(b).square().mean(), 0.01, 5)
    # eta_k = eta_const (eta_min / eta_const)^(k / (K - 1)), eta_const = 0.1 (current), eta_min = 0.01 * 0.2
    expected = [0.1 * (0.002 / 0.1) ** (k / 4) for k in range(5)]
    assert lrs == pytest.approx(expected, rel=1e-12)
    assert opt.param_groups[0]["lr"] == 0.1


def test_anneal_copy_refuses_parameters_outside_the_network():
    net, _ = _net_and_adam()
    extra = nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD(list(net.parameters()) + [extra], lr=0.1)
    with pytest.raises(ValueError, match="outside `network`"):
        anneal_copy(net, opt, [torch.randn(8, 4)], lambda n, b: n(b).sum(), 0.01, 1)
