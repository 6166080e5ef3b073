"""Bad input gets a clear error and loses nothing."""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from zoo.core.callbacks import NonFiniteLossError
from zoo.core.cli import ZooCLI
from zoo.core.datasets import MissingDatasetError, load_image_set
from zoo.fixmatch.module import FixMatch

ROOT = Path(__file__).resolve().parents[1]
DIGITS = str(ROOT / "experiments" / "fixmatch_digits.yaml")


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "zoo", "fit", *args], capture_output=True, text=True, timeout=300,
                          env=env)


def test_misspelled_model_key_names_it_and_the_valid_ones():
    out = run_cli("--config", DIGITS, "--model.init_args.treshold=0.9")
    assert out.returncode != 0
    assert "treshold" in out.stderr and "Did you mean: threshold" in out.stderr and "lambda_u" in out.stderr
    assert not Path("runs").exists()  # stopped before anything was built


def test_misspelled_trainer_key_fails_instead_of_abbreviating():
    out = run_cli("--config", DIGITS, "--trainer.max_step=3")
    assert out.returncode != 0 and "--trainer.max_steps" in out.stderr


def test_misspelled_key_inside_a_yaml_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(Path(DIGITS).read_text().replace("lambda_u:", "lamda_u:"))
    out = run_cli("--config", str(bad))
    assert out.returncode != 0 and "lamda_u" in out.stderr and "Did you mean: lambda_u" in out.stderr


def test_missing_dataset_names_the_path(tmp_path, monkeypatch):
    monkeypatch.setenv("ZOO_DATA_DIR", str(tmp_path / "empty"))
    monkeypatch.setenv("ZOO_SHARED_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(MissingDatasetError, match=str(tmp_path / "empty" / "cifar10")):
        load_image_set("cifar10", download=False)
    with pytest.raises(MissingDatasetError, match="cifar10_subset.npz"):
        load_image_set("cifar10_subset")
    with pytest.raises(ValueError, match="available"):
        load_image_set("cifar11")


class NaNAtStep(FixMatch):
    """FixMatch whose loss turns NaN at one step, as a diverging run's would."""

    def __init__(self, *args, nan_at_step: int = 3, **kwargs):
        super().__init__(*args, **kwargs)
        self.nan_at_step = nan_at_step

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * math.nan if self.global_step == self.nan_at_step else loss


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint():
    args = ["fit", "--config", DIGITS, "--model=test_bad_input.NaNAtStep", "--model.nan_at_step=3",
            "--run.name=nan", "--trainer.max_steps=6", "--trainer.limit_val_batches=0",
            "--data.init_args.batch_size=8", "--data.init_args.uratio=2", "--data.init_args.num_workers=0",
            "--run.checkpoint_every_n_steps=2", "--trainer.enable_progress_bar=false"]
    with pytest.raises(NonFiniteLossError, match="step 3"):
        ZooCLI(args=args)
    ckpt = torch.load("runs/nan/checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 3  # the state before the NaN step, never the NaN update
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
