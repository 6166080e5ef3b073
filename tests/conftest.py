"""Tests run offline on CPU: offline datasets from ../shared/data (or ZOO_DATA_DIR), W&B disabled unless a test
turns it on, no hub access."""
from __future__ import annotations

import os
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
    """Every test runs in its own directory so run directories never collide."""
    monkeypatch.chdir(tmp_path)
    yield
