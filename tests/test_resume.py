"""Resume exactness: N steps straight == k steps, interruption, rerun of the same command, N-k steps.

One experiment of every family (semi-supervised images, DAFormer segmentation, language models: pre-training,
rounds, weak-to-strong) and of every paper folder with its own data module, at tiny sizes: the resumed run trains on
exactly the batches the straight run trained on after step k, and ends with the same weights (EMA / teacher
included), optimizer state and LR-scheduler step, also where training draws from the global random generators
(dropout, noise, mixing: restored by ``zoo.core.callbacks.RandomState``), where the checkpoint is at an epoch's last
step, with worker processes, and with ``max_epochs`` set (the loader is then built before Lightning restores its
loops).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback

from helpers import SimulatedInterruption
from zoo.core.cli import ZooCLI

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0", "--trainer.enable_progress_bar=false",
          "--run.checkpoint_every_n_steps=1", "--data.init_args.num_workers=0"]


@dataclass
class Case:
    experiment: str
    steps: int  # N
    interrupt_at: int  # k
    overrides: tuple[str, ...]

    def command(self, name: str, *extra: str) -> list[str]:
        return ["fit", "--config", str(ROOT / "experiments" / f"{self.experiment}.yaml"), f"--run.name={name}",
                f"--trainer.max_steps={self.steps}", *COMMON, *self.overrides, *extra]


# Interrupted mid-epoch: in the second epoch where a step is cheap, in the first for the slow networks
FIXMATCH = Case("fixmatch_digits", 7, 5, ("--data.init_args.batch_size=8", "--data.init_args.uratio=2",
                                          "--data.init_args.steps_per_epoch=4"))
TINY_LM = tuple(f"--model.init_args.network.init_args.{a}" for a in ("checkpoint=", "num_layers=1", "hidden_size=32"))
ROUNDS = ("--data.init_args.prompts_per_round=8", "--data.init_args.batch_size=4",
          "--data.init_args.epochs_per_round=1", "--trainer.max_epochs=10")
W2S = ("--data.init_args.n_docs=64", "--data.init_args.n_test_docs=16", "--data.init_args.batch_size=8")  # 4 steps
CASES = [
    pytest.param(FIXMATCH, id="semisup"),
    pytest.param(Case("fixmatch_digits", 7, 4, FIXMATCH.overrides), id="semisup-epoch_end"),
    pytest.param(Case("fixmatch_digits", 7, 5, (*FIXMATCH.overrides, "--data.init_args.num_workers=2")),
                 id="semisup-workers"),
    pytest.param(Case("daformer_camvid_day_dusk", 2, 1, (
        "--data.init_args.batch_size=2", "--data.init_args.steps_per_epoch=2", "--data.init_args.crop_size=[48,64]",
        "--model.init_args.network.init_args.widths=[8,16,32,64]", "--model.init_args.network.init_args.embed_dim=16",
        "--model.init_args.warmup_steps=2")), id="segda"),
    pytest.param(Case("lm_pretrain_shakespeare", 4, 3, (
        *TINY_LM, "--data.init_args.batch_size=4", "--data.init_args.block_size=32",
        "--data.init_args.steps_per_epoch=2", "--model.init_args.warmup_steps=2")),
        id="lm"),
    # rounds (8 prompts -> at most 2 steps each): resumed in round 1 from the round the checkpoint carries
    pytest.param(Case("cream_arithmetic", 4, 3, (*TINY_LM, *(f"--model.init_args.reference.init_args.{a}" for a in (
        "checkpoint=", "num_layers=1", "hidden_size=32")), "--model.init_args.num_samples=2",
        "--model.init_args.max_new_tokens=4", "--model.init_args.warmup_steps=1", *ROUNDS)), id="lm-rounds-cream"),
    pytest.param(Case("raft_shakespeare_vader", 4, 3, (*TINY_LM, "--model.init_args.top_reward_percentage=0.5",
                                                       "--model.init_args.output_min_length=2",
                                                       "--model.init_args.output_max_length=5", *ROUNDS),), id="lm-rounds-raft"),
    # weak-to-strong trains without dropout: nothing random once the batches are right
    pytest.param(Case("weak_to_strong_ag_news_weak", 6, 5, (*W2S, "--trainer.max_epochs=-1")), id="lm-weak_to_strong"),
    pytest.param(Case("weak_to_strong_ag_news_weak", 6, 5, W2S), id="lm-weak_to_strong-max_epochs"),
    pytest.param(Case("consistent_teacher_raccoon", 4, 3, (
        "--data.init_args.batch_size=2", "--data.init_args.uratio=1", "--data.init_args.steps_per_epoch=2",
        "--data.init_args.train_short_side=[64,96]", "--data.init_args.max_long_side=128",
        "--model.init_args.unsup_warmup_steps=1", "--model.init_args.warmup_steps=2")), id="consistent_teacher"),
    pytest.param(Case("mic_mnist_usps", 2, 1, ("--data.init_args.batch_size=4", "--data.init_args.steps_per_epoch=2"),), id="mic"),
    pytest.param(Case("ict_mnist", 2, 1, (
        "--data.init_args.batch_size=4", "--data.init_args.steps_per_epoch=2",
        "--model.init_args.network.init_args.model_channels=8",
        "--model.init_args.network.init_args.channel_mult=[1,2]",
        "--model.init_args.network.init_args.attn_resolutions=[]")), id="ict"),
]


def final_state(name: str) -> dict:
    return torch.load(Path("runs") / name / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)


def assert_same_tensors(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for key in a:
        torch.testing.assert_close(torch.as_tensor(a[key]), torch.as_tensor(b[key]), rtol=0, atol=1e-6,
                                   msg=f"{what}: {key}")


def assert_same_state(a: dict, b: dict, steps: int) -> None:
    assert a["global_step"] == b["global_step"] == steps
    assert_same_tensors(a["state_dict"], b["state_dict"], "state_dict")  # network, EMA / teacher, buffers
    assert len(a["optimizer_states"]) == len(b["optimizer_states"])
    for opt_a, opt_b in zip(a["optimizer_states"], b["optimizer_states"]):
        assert opt_a["state"].keys() == opt_b["state"].keys()
        for i in opt_a["state"]:  # every per-parameter buffer: SGD momentum, Adam's exp_avg / exp_avg_sq / step
            assert_same_tensors(opt_a["state"][i], opt_b["state"][i], f"optimizer state of parameter {i}")
        assert opt_a["param_groups"] == opt_b["param_groups"]  # lr, betas, weight decay
    assert len(a["lr_schedulers"]) == len(b["lr_schedulers"])
    for sched_a, sched_b in zip(a["lr_schedulers"], b["lr_schedulers"]):
        assert sched_a["last_epoch"] == sched_b["last_epoch"] and sched_a["_last_lr"] == sched_b["_last_lr"]


class RecordIndices(Callback):
    """The dataset indices of every training batch (every ``idx`` of a batch and of its streams)."""

    def __init__(self):
        self.steps: list = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.steps.append(_indices(batch))


def _indices(batch):
    if isinstance(batch, dict):
        if "idx" in batch or "input_ids" in batch:  # dataset indices, or the tokens of a round's examples
            return batch["idx" if "idx" in batch else "input_ids"].tolist()
        return {k: _indices(v) for k, v in batch.items()}
    return None


@dataclass
class Run:
    state: dict  # last.ckpt
    batches: list  # indices of the batches this process trained on


def fit(case: Case, name: str, *extra: str) -> Run:
    cli = ZooCLI(args=case.command(name, "--trainer.callbacks+=test_resume.RecordIndices", *extra))
    recorder = next(cb for cb in cli.trainer.callbacks if isinstance(cb, RecordIndices))
    return Run(final_state(name), recorder.steps)


def run_straight_and_interrupted(case: Case) -> tuple[Run, Run]:
    straight = fit(case, "straight")
    with pytest.raises(SimulatedInterruption):
        fit(case, "resumed", "--trainer.callbacks+=helpers.InterruptAt",
            f"--trainer.callbacks.step={case.interrupt_at}")
    assert final_state("resumed")["global_step"] == case.interrupt_at
    return straight, fit(case, "resumed")  # the same command again


@pytest.mark.parametrize("case", CASES)
def test_interrupted_run_resumes_exactly(case):
    straight, resumed = run_straight_and_interrupted(case)
    # exactly the batches the interrupted run would have seen next
    assert resumed.batches == straight.batches[case.interrupt_at:]
    assert_same_state(straight.state, resumed.state, case.steps)


def test_resume_in_the_first_epoch_continues_the_wandb_run(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    case = Case(FIXMATCH.experiment, FIXMATCH.steps, 2, FIXMATCH.overrides)
    straight, resumed = run_straight_and_interrupted(case)
    assert_same_state(straight.state, resumed.state, case.steps)
    # one W&B run across the interruption
    run_dirs = list((Path("runs") / "resumed" / "wandb").glob("offline-run-*"))
    # offline-run-<date>_<time>-<id>, with a "-1" suffix when both parts start within the same second
    assert len(run_dirs) >= 2 and len({d.name.split("-")[3] for d in run_dirs}) == 1


def test_finished_run_keeps_its_final_state_and_a_rerun_does_not_train_again():
    # 7 steps, checkpoints every 5: Lightning alone would leave last.ckpt at step 5
    command = FIXMATCH.command("finished", "--run.checkpoint_every_n_steps=5")
    ZooCLI(args=command)
    first = final_state("finished")
    assert first["global_step"] == FIXMATCH.steps
    ZooCLI(args=command)  # rerun: nothing left to train
    assert_same_state(first, final_state("finished"), FIXMATCH.steps)


def test_a_run_directory_of_another_experiment_is_not_resumed():
    """Two comparisons with the same method names under one ``--run.root``: the second must not continue the first
    one's checkpoint on its own data; the error names what differs, and the first run is left as it was."""
    command = FIXMATCH.command("taken", "--trainer.max_steps=2")
    ZooCLI(args=command)
    before = final_state("taken")
    with pytest.raises(ValueError, match=r"another experiment \(data.init_args.dataset: 'digits' -> 'mnist'"):
        ZooCLI(args=command + ["--data.init_args.dataset=mnist"])
    assert_same_state(before, final_state("taken"), 2)
    ZooCLI(args=command + ["--trainer.max_steps=3"])  # a longer run of the same experiment resumes
    assert final_state("taken")["global_step"] == 3
