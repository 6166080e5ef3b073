"""Shared test utilities: build an experiment through the real CLI, with its offline overlay where it has one."""
from __future__ import annotations

import copy
from pathlib import Path

import torch
import yaml
from lightning.pytorch import Callback

from zoo.core.cli import ZooCLI
from zoo.core.teacher import EMATeacher, StopGradTeacher
from zoo.tools.smoke import smoke_args

def offline_overlay(config_path: Path) -> list[str]:
    """``experiments/offline/<stem>.yaml``, the offline stand-in of a paper setting whose data or hub weights only
    exist for users with internet, as a second ``--config`` (same module and code path); none for other files."""
    overlay = Path(config_path).parent / "offline" / Path(config_path).name
    return ["--config", str(overlay)] if overlay.exists() else []


def build(config_path, run_root, *extra, smoke=True) -> ZooCLI:
    args = (smoke_args(str(config_path), str(run_root), subcommand=False, overlays=offline_overlay(config_path))
            if smoke else ["--config", str(config_path), *offline_overlay(config_path), f"--run.root={run_root}"])
    return ZooCLI(args=args + list(extra), run=False)


def _max_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((float((x - y).abs().max()) for x, y in zip(a, b) if x.numel()), default=0.0)


class _EMAStepRecord:
    """One training step of an :class:`EMATeacher`: its ``update`` is wrapped on the instance for the step, so each
    call is checked to move the parameters by exactly ``t <- t + (1 - decay)(source - t)``; the parameters at the
    batch start must equal those before the first call, and those after the last call those at the batch end."""

    def __init__(self, teacher: EMATeacher):
        self.teacher = teacher
        self.calls: list[tuple[float, object, float]] = []  # (decay, source, deviation from the rule)
        self.outside = 0.0  # the largest change of a parameter between calls: outside the rule
        self.start = self.last = self.snapshot()
        update = teacher.update

        def recorded_update(source, decay):
            source = source if isinstance(source, torch.nn.Module) else list(source)  # FST passes a generator
            before = self.snapshot()
            self.outside = max(self.outside, _max_difference(before, self.last))
            targets = source.parameters() if isinstance(source, torch.nn.Module) else source
            expected = [b + (1 - decay) * (s.detach() - b) for b, s in zip(before, targets)]
            update(source, decay)
            self.last = self.snapshot()
            self.calls.append((decay, source, _max_difference(self.last, expected)))

        teacher.update = recorded_update

    def snapshot(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.teacher.module.parameters()]

    def finish(self) -> list[torch.Tensor]:
        del self.teacher.update  # the class's method again
        end = self.snapshot()
        self.outside = max(self.outside, _max_difference(end, self.last))
        return end


class StepChecker(Callback):
    """Checks, on every training step: finite loss, a finite gradient for every trainable parameter (non-zero on at
    least one step: a zero-initialised head stops the backbone's gradient on the first step only), and that every
    teacher of ``pl_module.teachers()`` moved only by its rule:

    - an :class:`EMATeacher` only through ``update`` calls, each moving it by exactly ``t <- t + (1 - decay)(source -
      t)``, not between steps, and at least once in the run; the base's ``ema`` once per step, from ``network``,
      with ``ema_decay_at(step)``;
    - a :class:`StopGradTeacher` has no parameters or buffers of its own and runs the module's trainable network.

    ``teacher_errors`` describes every violation; ``ema_errors`` holds each step's largest deviation of an EMA
    teacher from its rule (0 up to rounding). ``teachers_checked`` names the teachers seen, ``update_calls`` counts
    each EMA teacher's updates.

    A module may name ``zero_grad_parameters`` (name prefixes) whose gradient can legitimately be exactly zero: a
    loss gated off early in training (ShrinkMatch's auxiliary head before any sample is confident; the paper's
    tests show it trains once the gate opens) or an invariance of the loss (a pairwise reward loss cannot see a
    shift shared by both rewards). Only their finiteness is checked here."""

    tolerance = 1e-6

    def __init__(self):
        self.steps = 0
        self.bad_grads: set[str] = set()
        self.moved: set[str] = set()
        self.trainable: set[str] = set()
        self.module = None
        self.ema_errors: list[float] = []
        self.teacher_errors: list[str] = []
        self.teachers_checked: set[str] = set()
        self.update_calls: dict[str, int] = {}
        self.losses: list[float] = []
        self._records: dict[str, _EMAStepRecord] = {}
        self._teacher_at_end: dict[str, list[torch.Tensor]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.module = pl_module
        trainable = {id(p) for p in pl_module.trainable_modules().parameters() if p.requires_grad}
        for name, teacher in pl_module.teachers().items():
            self.teachers_checked.add(name)
            if isinstance(teacher, EMATeacher):
                self._records[name] = record = _EMAStepRecord(teacher)
                if name in self._teacher_at_end and _max_difference(record.start, self._teacher_at_end[name]):
                    self.teacher_errors.append(f"step {trainer.global_step}: {name} changed between steps")
            elif isinstance(teacher, StopGradTeacher):
                own = list(teacher.parameters()) + list(teacher.buffers())
                runs = list(teacher.module.parameters())
                if own or not runs or not all(id(p) in trainable for p in runs):
                    self.teacher_errors.append(f"{name}: a stop-gradient teacher must hold no state and run the "
                                               "module's trainable network")
            else:
                self.teacher_errors.append(f"{name}: {type(teacher).__name__} has no rule in StepChecker")

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
        step = trainer.global_step - 1  # the optimizer step this batch took
        for name, record in self._records.items():
            self._teacher_at_end[name] = record.finish()
            self.update_calls[name] = self.update_calls.get(name, 0) + len(record.calls)
            deviation = max([record.outside] + [error for *_, error in record.calls])
            self.ema_errors.append(deviation)
            if record.outside > self.tolerance:
                self.teacher_errors.append(f"step {step}: {name} moved by {record.outside:.3g} outside update()")
            for decay, _, error in record.calls:
                if error > self.tolerance:
                    self.teacher_errors.append(f"step {step}: {name}.update(decay={decay}) is off the rule by "
                                               f"{error:.3g}")
            if record.teacher is pl_module.ema:  # the base's rule: once per optimizer step, with its declared decay
                expected = [(pl_module.ema_decay_at(step), pl_module.network)]
                if [(decay, source) for decay, source, _ in record.calls] != expected:
                    self.teacher_errors.append(
                        f"step {step}: ema updated {[d for d, *_ in record.calls]}, expected once from network "
                        f"with ema_decay_at({step}) = {expected[0][0]}")
        self._records = {}

    def on_train_end(self, trainer, pl_module):
        self.teacher_errors += [f"{name} was never updated" for name, calls in self.update_calls.items() if not calls]


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
