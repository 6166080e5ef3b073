"""The whole-registry sweep: every experiment file parses, instantiates and trains a few steps correctly."""
from __future__ import annotations

import math

import pytest

from conftest import EXPERIMENTS
from helpers import StepChecker, build


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
    if cli.model.ema is not None:
        assert max(checker.ema_errors) < 1e-6
    logged = set(cli.trainer.logged_metrics) | set(cli.trainer.callback_metrics)
    expected = set(getattr(cli.model, "expected_metrics", ("val/acc",)))
    assert expected <= logged, f"missing metrics {expected - logged}; logged: {sorted(logged)}"
