"""Tests run offline on CPU: offline datasets from ../shared/data (or ZOO_DATA_DIR), W&B disabled unless a test
turns it on, no hub access."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("ZOO_DATA_DIR", str(ROOT.parent / "shared" / "data"))
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("PYTHONWARNINGS", "ignore")

EXPERIMENTS = sorted((ROOT / "experiments").glob("*.yaml"))


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    """Every test runs in its own directory so run directories never collide, and leaves no W&B run open: a run
    built without the CLI's subcommand (``run=False``) is never finished, and Lightning's W&B logger would reuse
    it in the next test instead of starting one in that test's run directory."""
    monkeypatch.chdir(tmp_path)
    yield
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish()
