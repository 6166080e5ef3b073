"""The whole-registry sweep: every experiment file parses, instantiates and trains a few steps correctly; and the
sweep's teacher check catches a teacher that moves outside its rule."""
from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from conftest import EXPERIMENTS
from helpers import StepChecker, build
from zoo.core.module import ZooModule
from zoo.core.teacher import EMATeacher, StopGradTeacher

# Papers whose teacher is their own (not the base's ``ema``): the sweep must find and check it.
OWN_TEACHER = ("fst_", "ict_")


def test_there_are_experiments():
    assert len(EXPERIMENTS) >= 3


@pytest.mark.parametrize("config", EXPERIMENTS, ids=[p.stem for p in EXPERIMENTS])
def test_experiment_smoke(config, tmp_path):
    cli = build(config, tmp_path)
    checker = StepChecker()
    cli.trainer.callbacks.append(checker)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)

    assert checker.steps == 3
    assert all(math.isfinite(x) for x in checker.losses), checker.losses
    assert not checker.missing_grads, f"parameters without a gradient: {sorted(checker.missing_grads)}"
    teachers = set(cli.model.teachers())
    assert checker.teachers_checked == teachers
    assert "teacher" in teachers or not config.stem.startswith(OWN_TEACHER)
    assert not checker.teacher_errors, checker.teacher_errors
    logged = set(cli.trainer.logged_metrics) | set(cli.trainer.callback_metrics)
    expected = set(getattr(cli.model, "expected_metrics", ("val/acc",)))
    assert expected <= logged, f"missing metrics {expected - logged}; logged: {sorted(logged)}"


# ----------------------------------------------------------------------------- the teacher check itself
class _SquaredDecayTeacher(EMATeacher):
    """A broken EMA: it moves by a decay other than the one it is given."""

    def update(self, source, decay):
        super().update(source, decay ** 2)


class _Pair(ZooModule):
    """The base's EMA, an EMA teacher of the paper's own and a stop-gradient teacher, on a linear layer."""

    def __init__(self, teacher_kind=EMATeacher, stopgrad_of_a_copy=False):
        super().__init__(nn.Linear(3, 2), ema_decay=0.9)
        self.teacher = teacher_kind(self.network)
        self.stopgrad = StopGradTeacher(copy.deepcopy(self.network) if stopgrad_of_a_copy else self.network)


def _run_checker(module: _Pair, after_step, steps: int = 2, between_steps=None) -> StepChecker:
    """The checker's hooks around ``steps`` optimizer steps by hand; ``after_step(module, step)`` does what the
    module does after the optimizer (``_correct``: the base's EMA update and one of the paper's teacher);
    ``between_steps(module, step)`` runs after the checker's end of the batch."""
    checker, trainer = StepChecker(), SimpleNamespace(global_step=0)
    optimizer = torch.optim.SGD(module.network.parameters(), lr=0.5)
    for step in range(steps):
        checker.on_train_batch_start(trainer, module, None, step)
        loss = module.network(torch.randn(4, 3)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        checker.on_before_optimizer_step(trainer, module, optimizer)
        optimizer.step()
        after_step(module, step)
        trainer.global_step += 1
        checker.on_train_batch_end(trainer, module, loss.detach(), None, step)
        if between_steps is not None:
            between_steps(module, step)
    return checker


def _correct(module: _Pair, step: int) -> None:
    module.ema.update(module.network, module.ema_decay_at(step))
    module.teacher.update(module.network.parameters(), 0.7)


def _then_by_hand(module: _Pair, step: int) -> None:
    _correct(module, step)
    with torch.no_grad():
        module.teacher.module.weight.add_(1e-3)


def test_checker_passes_teachers_that_follow_their_rules():
    checker = _run_checker(_Pair(), _correct)
    assert checker.teachers_checked == {"ema", "teacher", "stopgrad"} and not checker.teacher_errors
    assert len(checker.ema_errors) == 4 and max(checker.ema_errors) < 1e-6


@pytest.mark.parametrize("module, after_step, error", [
    (_Pair(), _then_by_hand, "teacher moved by 0.001 outside update()"),
    (_Pair(), lambda m, s: (m.ema.update(m.network, 0.5), m.teacher.update(m.network, 0.7)),
     "expected once from network with ema_decay_at"),
    (_Pair(_SquaredDecayTeacher), _correct, "teacher.update(decay=0.7) is off the rule"),
    (_Pair(stopgrad_of_a_copy=True), _correct, "stopgrad: a stop-gradient teacher must hold no state"),
], ids=["modified_by_hand", "wrong_decay", "update_ignores_its_decay", "stopgrad_of_a_copy"])
def test_checker_catches_a_teacher_off_its_rule(module, after_step, error):
    checker = _run_checker(module, after_step)
    assert any(error in e for e in checker.teacher_errors), checker.teacher_errors


def test_checker_catches_a_teacher_changed_between_steps():
    def nudge(module, step):  # e.g. a module's on_train_batch_end, which runs after the checker's
        with torch.no_grad():
            module.teacher.module.bias.add_(1e-3)
    checker = _run_checker(_Pair(), _correct, between_steps=nudge)
    assert checker.teacher_errors == ["step 1: teacher changed between steps"]
