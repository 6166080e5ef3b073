"""Resume exactness: N steps straight == k steps, interruption, rerun of the same command, N-k steps."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import SimulatedInterruption
from zoo.core.cli import ZooCLI

ROOT = Path(__file__).resolve().parents[1]
N = 7


def command(name: str, *extra: str) -> list[str]:
    return ["fit", "--config", str(ROOT / "experiments" / "fixmatch_digits.yaml"), f"--run.name={name}",
            f"--trainer.max_steps={N}", "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false",
            "--data.init_args.batch_size=8", "--data.init_args.uratio=2", "--data.init_args.steps_per_epoch=4",
            "--data.init_args.num_workers=0", "--run.checkpoint_every_n_steps=1", *extra]


def final_state(name: str) -> dict:
    return torch.load(Path("runs") / name / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)


def assert_same_state(a: dict, b: dict) -> None:
    assert a["global_step"] == b["global_step"] == N
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:  # network, EMA and BN buffers
        torch.testing.assert_close(a["state_dict"][key], b["state_dict"][key], rtol=0, atol=1e-6, msg=key)
    opt_a, opt_b = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    for i in opt_a:
        torch.testing.assert_close(opt_a[i]["momentum_buffer"], opt_b[i]["momentum_buffer"], rtol=0, atol=1e-6)
    assert a["lr_schedulers"][0]["last_epoch"] == b["lr_schedulers"][0]["last_epoch"]


@pytest.mark.parametrize("interrupt_at", [2, 5])  # mid-epoch in the first and in the second epoch
def test_interrupted_run_resumes_exactly(interrupt_at, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    ZooCLI(args=command("straight"))
    with pytest.raises(SimulatedInterruption):
        ZooCLI(args=command("resumed", "--trainer.callbacks+=helpers.InterruptAt",
                            f"--trainer.callbacks.step={interrupt_at}"))
    assert final_state("resumed")["global_step"] == interrupt_at
    ZooCLI(args=command("resumed"))  # the same command again
    assert_same_state(final_state("straight"), final_state("resumed"))

    # one W&B run across the interruption
    run_dirs = list((Path("runs") / "resumed" / "wandb").glob("offline-run-*"))
    # offline-run-<date>_<time>-<id>, with a "-1" suffix when both parts start within the same second
    assert len(run_dirs) >= 2 and len({d.name.split("-")[3] for d in run_dirs}) == 1


def test_finished_run_keeps_its_final_state_and_a_rerun_does_not_train_again():
    # 7 steps, checkpoints every 5: Lightning alone would leave last.ckpt at step 5
    ZooCLI(args=command("finished", "--run.checkpoint_every_n_steps=5"))
    first = final_state("finished")
    assert first["global_step"] == N
    ZooCLI(args=command("finished", "--run.checkpoint_every_n_steps=5"))  # rerun: nothing left to train
    assert_same_state(first, final_state("finished"))
