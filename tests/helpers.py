"""Shared test utilities: build an experiment through the real CLI, with the offline stand-in for full datasets."""
from __future__ import annotations

import copy
from pathlib import Path

import torch
import yaml
from lightning.pytorch import Callback

from zoo.core.cli import ZooCLI
from zoo.core.datasets import MissingDatasetError, load_image_set
from zoo.core.smoke import smoke_args

# Full-size datasets that are not on this machine are replaced by their offline stand-in *here*, never in the library.
STAND_INS = {"cifar10": "cifar10_subset", "cifar100": "cifar10_subset"}

# Paper settings whose data or pretrained weights only exist for users with internet (GTA5, Cityscapes, VisDA,
# COCO 2017) or whose network takes minutes per CPU step: the sweep runs the same module and code path on an
# offline pair of datasets and a smaller network. Only the sweep uses these; the YAML files stay the paper's.
W2S_STAND_IN = ["--model.init_args.network.init_args.backbone=tiny-bert", "--data.init_args.tokenizer=minilm",
                "--data.init_args.max_length=64", "--trainer.precision=32-true"]
RC_SMALL = ["--data.init_args.n_test=32", "--data.init_args.n_train=64", "--data.init_args.contrast_min_similarity=0.3"]
PAPER_SETTING_STAND_INS = {
    "mic_gta_cityscapes": ["--data.init_args.source=camvid_day", "--data.init_args.target=camvid_dusk",
                           "--model.init_args.network.init_args.pretrained=",
                           "--model.init_args.network.init_args.variant=b0"],
    "fst_gta_cityscapes": ["--data.init_args.source=camvid_day", "--data.init_args.target=camvid_dusk",
                           "--model.init_args.network.init_args.pretrained=",
                           "--model.init_args.network.init_args.variant=b0"],
    "hiast_gta_cityscapes": ["--data.init_args.source=camvid_day", "--data.init_args.target=camvid_dusk",
                             "--model.init_args.network.init_args.pretrained=",
                             "--model.init_args.network.init_args.variant=b0"],
    "mic_visda": ["--data.init_args.source=mnist", "--data.init_args.target=usps",
                  "--model.init_args.network.init_args.backbone.init_args.pretrained=",
                  "--model.init_args.network.init_args.backbone.init_args.variant=tiny"],
    "consistent_teacher_coco10": ["--data.init_args.dataset=coco128", "--data.init_args.train_short_side=[128,160]",
                                  "--data.init_args.max_long_side=192", "--data.init_args.test_short_side=128",
                                  "--data.init_args.test_max_long_side=192"],
    "shrinkmatch_cifar100": ["--model.init_args.network.init_args.widen=2"],
    # language models: the CPU settings start from the zoo's own pre-trained checkpoints (made by other experiment
    # files, not present in a clean clone): the sweep starts them from random init; the paper settings name hub
    # models, which become the tiny byte-level model.
    "lm_sft_arithmetic": ["--model.init_args.network.init_args.checkpoint="],
    "raft_shakespeare_vader": ["--model.init_args.network.init_args.checkpoint="],
    "cream_arithmetic": ["--model.init_args.network.init_args.checkpoint=",
                         "--model.init_args.reference.init_args.checkpoint="],
    "cream_arithmetic_srlm": ["--model.init_args.network.init_args.checkpoint=",
                              "--model.init_args.reference.init_args.checkpoint="],
    "raft_imdb": ["--model.init_args.network.init_args.pretrained=", "--model.init_args.reward=zoo.raft.rewards.VaderReward",
                  "--data.init_args.prompts=tiny_shakespeare", "--data.init_args.prompts_per_round=16",
                  "--data.init_args.prompt_chars=24", "--trainer.precision=32-true"],
    # reward models and weak-to-strong: hub backbones become a random-init BERT on MiniLM's vocabulary, and the
    # reward-consistency sets shrink (building them embeds every text with MiniLM)
    "weak_to_strong_hh_gpt2": W2S_STAND_IN,
    "weak_to_strong_hh_gpt2_medium": W2S_STAND_IN,
    "reward_consistency_hh_rlhf": RC_SMALL,
    "reward_consistency_hh_rlhf_convex_da": RC_SMALL + ["--data.init_args.augment_pairs=8"],
    "reward_consistency_twitter_llama7b": RC_SMALL + [
        "--data.init_args.task=hh_rlhf", "--data.init_args.tokenizer=minilm", "--data.init_args.max_length=64",
        "--model.init_args.network.init_args.backbone=tiny-bert", "--model.init_args.network.init_args.lora_rank=0",
        "--trainer.precision=32-true"],
    "cream_llama3_gsm8k": ["--model.init_args.network.init_args.pretrained=",
                           "--model.init_args.network.init_args.lora_rank=0",
                           "--model.init_args.network.init_args.dtype=float32",
                           "--model.init_args.reference.init_args.pretrained=",
                           "--model.init_args.reference.init_args.dtype=float32",
                           "--model.init_args.max_new_tokens=8", "--model.init_args.eval_max_new_tokens=8",
                           "--data.init_args.prompts=two_digit_arithmetic", "--data.init_args.prompts_per_round=16",
                           "--trainer.precision=32-true"],
}


def stand_in_args(config_path: Path) -> list[str]:
    config = yaml.safe_load(Path(config_path).read_text())
    dataset = (config.get("data") or {}).get("init_args", {}).get("dataset")
    stand_ins = list(PAPER_SETTING_STAND_INS.get(Path(config_path).stem, []))
    if dataset in STAND_INS:
        try:
            load_image_set(dataset, download=False)
        except MissingDatasetError:
            stand_ins += [f"--data.init_args.dataset={STAND_INS[dataset]}", "--data.init_args.download=false"]
    return stand_ins


def build(config_path, run_root, *extra, smoke=True) -> ZooCLI:
    args = (smoke_args(str(config_path), str(run_root), subcommand=False) if smoke
            else ["--config", str(config_path), f"--run.root={run_root}"])
    return ZooCLI(args=args + stand_in_args(config_path) + list(extra), run=False)


class StepChecker(Callback):
    """Checks, on every training step: finite loss, a finite gradient for every trainable parameter (non-zero on at
    least one step: a zero-initialised head stops the backbone's gradient on the first step only), and that the EMA
    moved by exactly ``ema <- ema + (1 - decay) (online - ema)``.

    A module may name ``zero_grad_parameters`` (name prefixes) whose gradient can legitimately be exactly zero: a
    loss gated off early in training (ShrinkMatch's auxiliary head before any sample is confident; the paper's
    tests show it trains once the gate opens) or an invariance of the loss (a pairwise reward loss cannot see a
    shift shared by both rewards). Only their finiteness is checked here."""

    def __init__(self):
        self.steps = 0
        self.bad_grads: set[str] = set()
        self.moved: set[str] = set()
        self.trainable: set[str] = set()
        self.module = None
        self.ema_errors: list[float] = []
        self.losses: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.module = pl_module
        self._ema_before = ([p.detach().clone() for p in pl_module.ema.module.parameters()]
                            if pl_module.ema is not None else None)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        for name, p in pl_module.named_parameters():
            if not p.requires_grad:
                continue
            if p.grad is None or not torch.isfinite(p.grad).all():
                self.bad_grads.add(name)
            elif p.grad.abs().sum():
                self.moved.add(name)
            self.trainable.add(name)

    @property
    def missing_grads(self) -> set[str]:
        """Trainable parameters with a missing or non-finite gradient on some step, or a zero one on every step."""
        allowed = tuple(getattr(self.module, "zero_grad_parameters", ()))
        never_moved = {n for n in self.trainable - self.moved if not n.startswith(allowed)}
        return self.bad_grads | never_moved

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss))
        self.steps += 1
        if self._ema_before is not None:
            decay = pl_module.ema_decay_at(trainer.global_step - 1)
            for before, ema, online in zip(self._ema_before, pl_module.ema.module.parameters(),
                                           pl_module.network.parameters()):
                expected = before + (1 - decay) * (online.detach() - before)
                self.ema_errors.append(float((ema - expected).abs().max()))


def load_yaml(path) -> dict:
    return copy.deepcopy(yaml.safe_load(Path(path).read_text()))


class SimulatedInterruption(RuntimeError):
    pass


class InterruptAt(Callback):
    """Raises after optimizer step ``step``, like a job killed mid-run (used by the resume test)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            raise SimulatedInterruption(f"interrupted at step {self.step}")


class RecordBatches(Callback):
    """Writes, per rank, the sample indices of every training step and the final validation metrics."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self.steps: list[dict] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.steps.append({k: v["idx"].tolist() for k, v in batch.items()})

    def on_fit_end(self, trainer, pl_module):
        import json

        Path(self.out_dir).mkdir(parents=True, exist_ok=True)
        with open(Path(self.out_dir) / f"rank{trainer.global_rank}.json", "w") as f:
            json.dump({"steps": self.steps, "world_size": trainer.world_size}, f)
