"""The base LightningModule: optimisation plumbing shared by every paper, and nothing of any paper's idea.

A paper subclasses :class:`ZooModule`, declares its hyper-parameters as ``__init__`` arguments with the paper's
defaults (the constructor is the config schema), passes the shared ones through, and implements
``training_step`` / ``validation_step``. The base provides:

- SGD / AdamW / RAdam / Adagrad with no weight decay on biases and normalisation parameters;
- linear warm-up then cosine decay over ``trainer.estimated_stepping_batches`` (or step decay at fractions of it);
  for continual pre-training, the infinite schedule (warm-up, cosine cool-down, then constant forever) or cosine
  cycles restarted every ``lr_cycle_steps`` (re-warm + decay at each task boundary);
- an optional EMA teacher of ``self.network`` updated right after every optimizer step (``self.ema``, an
  :class:`~zoo.core.teacher.EMATeacher`), and :meth:`ZooModule.teachers`, every teacher a paper keeps.
"""
from __future__ import annotations

import math
from typing import Literal

import lightning as L
import torch
import torch.nn as nn

from .metrics import accuracy
from .teacher import EMATeacher, Teacher

__all__ = ["ZooModule", "infinite_cosine", "param_groups", "repeated_cosine", "warmup_cosine", "warmup_step"]

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def param_groups(module: nn.Module, weight_decay: float, lr: float | None = None,
                 lr_multipliers: dict[str, float] | None = None, decay_norm_and_bias: bool = False) -> list[dict]:
    """Parameter groups: weights with ``weight_decay``; biases, normalisation parameters (any BatchNorm, GroupNorm,
    LayerNorm) and other 1-d parameters without, unless ``decay_norm_and_bias`` (plain ``SGD(weight_decay=...)`` on
    every parameter, as some official codes train). ``lr_multipliers`` maps a parameter-name prefix to a learning-rate
    factor (DAFormer's head at 10x lr), each group then carrying its own ``lr``. A parameter shared by two modules
    (tied input/output embeddings of a language model) is listed once."""
    multipliers = lr_multipliers or {}
    groups: dict[tuple[bool, float], list] = {}
    seen = set()
    for module_name, mod in module.named_modules():
        for name, p in mod.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            full_name = f"{module_name}.{name}" if module_name else name
            no_decay = not decay_norm_and_bias and (isinstance(mod, _NORM_TYPES) or name.endswith("bias") or p.ndim <= 1)
            factor = next((f for prefix, f in multipliers.items() if full_name.startswith(prefix)), 1.0)
            groups.setdefault((no_decay, factor), []).append(p)
    out = []
    for (no_decay, factor), params in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        group = {"params": params, "weight_decay": 0.0 if no_decay else weight_decay}
        if lr is not None:
            group["lr"] = lr * factor
        out.append(group)
    return out


def warmup_cosine(step: int, total: int, warmup: int, cycles: float) -> float:
    """LR multiplier: linear warm-up, then ``max(0, cos(pi * cycles * progress))``.

    ``cycles=7/16`` is FixMatch's ``cos(7 pi k / 16 K)``; ``cycles=0.5`` decays to zero at the end.
    """
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, math.cos(math.pi * cycles * progress))


def warmup_step(step: int, total: int, warmup: int, milestones: tuple[float, ...], gamma: float) -> float:
    """LR multiplier: linear warm-up, then ``gamma`` to the number of ``milestones`` (fractions of ``total``
    steps) already passed; ``(0.5, 0.75)``, ``gamma=0.1`` is the classic CIFAR ResNet schedule."""
    if step < warmup:
        return (step + 1) / warmup
    return gamma ** sum(step >= int(fraction * total) for fraction in milestones)


def infinite_cosine(step: int, warmup: int, cooldown: int, constant_ratio: float) -> float:
    """LR multiplier of the infinite schedule (Ibrahim et al., 2024, "inf-cos"): linear warm-up to 1 over ``warmup``
    steps, cosine cool-down from 1 to ``constant_ratio`` (eta_const / eta_max) over ``cooldown`` steps, then
    ``constant_ratio`` for ever. No total step count: a run can always be continued on new data. (The final
    exponential annealing eta_const -> eta_min is applied to a copy of the model before evaluating it, by the caller.)
    """
    if step < warmup:
        return (step + 1) / warmup
    if step < warmup + cooldown:
        progress = (step - warmup) / cooldown
        return constant_ratio + (1 - constant_ratio) * (1 + math.cos(math.pi * progress)) / 2
    return constant_ratio


def repeated_cosine(step: int, cycle: int, warmup: int, min_ratio: float) -> float:
    """LR multiplier restarted every ``cycle`` steps (one cycle per task of a continual run): linear re-warm-up to 1
    over ``warmup`` steps, then cosine decay to ``min_ratio`` (eta_min / eta_max) at the cycle's end."""
    step = step % cycle
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, cycle - warmup)
    return min_ratio + (1 - min_ratio) * (1 + math.cos(math.pi * progress)) / 2


class ZooModule(L.LightningModule):
    """Base for every paper. ``network`` is the trained model; subclasses add their own heads and losses.

    Args:
        network: the backbone + classifier (or any model) being trained.
        optimizer: ``sgd`` (with ``momentum`` / ``nesterov``), ``adamw``, ``radam`` or ``adagrad``.
        lr, weight_decay, momentum, nesterov: optimiser settings; weight decay skips biases and norms.
        warmup_steps: linear warm-up length in optimizer steps.
        lr_schedule: ``cosine`` (see :func:`warmup_cosine`, with ``cosine_cycles``), ``step`` (see
            :func:`warmup_step`, with ``lr_milestones`` and ``lr_gamma``), ``constant``, ``infinite`` (see
            :func:`infinite_cosine`, with ``cooldown_steps`` and ``constant_lr_ratio``) or ``repeated_cosine`` (see
            :func:`repeated_cosine`, with ``lr_cycle_steps`` and ``min_lr_ratio``); the last two need no total
            step count.
        cooldown_steps, constant_lr_ratio: ``infinite``: cosine cool-down length, and eta_const / lr after it.
        lr_cycle_steps, min_lr_ratio: ``repeated_cosine``: the restart period (a task's length) and eta_min / lr.
        decay_norm_and_bias: weight decay on biases and normalisation parameters too.
        ema_decay: if set, keep ``self.ema``, an EMA of ``network`` with this decay.
        ema_buffers: ``copy`` or ``average`` BatchNorm statistics into the EMA.
        compile: wrap ``network`` in ``torch.compile``.
    """

    def __init__(self, network: nn.Module, optimizer: Literal["sgd", "adamw", "radam", "adagrad"] = "sgd", lr: float = 0.03,
                 weight_decay: float = 5e-4, momentum: float = 0.9, nesterov: bool = True, warmup_steps: int = 0,
                 lr_schedule: Literal["cosine", "step", "constant", "infinite", "repeated_cosine"] = "cosine",
                 cosine_cycles: float = 7 / 16, lr_milestones: tuple[float, ...] = (0.5, 0.75), lr_gamma: float = 0.1,
                 cooldown_steps: int = 0, constant_lr_ratio: float = 0.1, lr_cycle_steps: int | None = None,
                 min_lr_ratio: float = 0.01,
                 decay_norm_and_bias: bool = False, ema_decay: float | None = 0.999, ema_buffers: Literal["copy", "average"] = "copy",
                 compile: bool = False):
        super().__init__()
        self.network = network
        self.optimizer_name, self.lr, self.weight_decay = optimizer, lr, weight_decay
        self.momentum, self.nesterov, self.warmup_steps = momentum, nesterov, warmup_steps
        self.lr_schedule, self.cosine_cycles = lr_schedule, cosine_cycles
        self.lr_milestones, self.lr_gamma, self.decay_norm_and_bias = tuple(lr_milestones), lr_gamma, decay_norm_and_bias
        self.cooldown_steps, self.constant_lr_ratio = cooldown_steps, constant_lr_ratio
        self.lr_cycle_steps, self.min_lr_ratio = lr_cycle_steps, min_lr_ratio
        self.ema_decay = ema_decay
        self.ema = EMATeacher(network, buffers=ema_buffers) if ema_decay is not None else None
        self.compile = compile

    def configure_model(self) -> None:
        if self.compile and not isinstance(self.network, torch._dynamo.eval_frame.OptimizedModule):
            self.network = torch.compile(self.network)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Predictions for deployment: the EMA network when there is one."""
        return (self.ema if self.ema is not None else self.network)(x)

    # ------------------------------------------------- classifier evaluation
    def setup(self, stage: str) -> None:
        num_classes = getattr(getattr(self.network, "classifier", None), "out_features", None)
        if num_classes and not hasattr(self, "val_acc"):
            self.val_acc = accuracy(num_classes)
            self.val_ema_acc = accuracy(num_classes) if self.ema is not None else None

    def classifier_validation_step(self, batch: dict) -> dict:
        """Top-1 accuracy of ``network`` (``val/acc``) and of its EMA (``val/ema_acc``) on ``batch["image"]``."""
        x, y = batch["image"], batch["label"]
        logits = self.network(x)
        self.val_acc(logits, y)
        self.log("val/acc", self.val_acc, on_epoch=True, prog_bar=True)
        if self.ema is not None:
            logits = self.ema(x)
            self.val_ema_acc(logits, y)
            self.log("val/ema_acc", self.val_ema_acc, on_epoch=True, prog_bar=True)
        return {"preds": logits.argmax(1)}

    # -------------------------------------------------------------- optimisation
    def trainable_modules(self) -> nn.Module:
        """What the optimiser trains; papers with extra heads keep them as submodules of ``self``."""
        return self

    def configure_optimizers(self):
        groups = param_groups(self.trainable_modules(), self.weight_decay, decay_norm_and_bias=self.decay_norm_and_bias)
        if self.optimizer_name == "sgd":
            opt = torch.optim.SGD(groups, lr=self.lr, momentum=self.momentum, nesterov=self.nesterov)
        elif self.optimizer_name == "adamw":
            opt = torch.optim.AdamW(groups, lr=self.lr)
        elif self.optimizer_name == "radam":
            opt = torch.optim.RAdam(groups, lr=self.lr)
        elif self.optimizer_name == "adagrad":
            opt = torch.optim.Adagrad(groups, lr=self.lr)
        else:
            raise ValueError(f"unknown optimizer {self.optimizer_name!r}; use sgd, adamw, radam or adagrad")
        if self.lr_schedule == "constant":
            return opt
        if self.lr_schedule == "infinite":
            factor = lambda step: infinite_cosine(step, self.warmup_steps, self.cooldown_steps, self.constant_lr_ratio)
        elif self.lr_schedule == "repeated_cosine":
            if not self.lr_cycle_steps or self.lr_cycle_steps <= self.warmup_steps:
                raise ValueError(f"lr_schedule='repeated_cosine' needs lr_cycle_steps (the steps of one task) > "
                                 f"warmup_steps={self.warmup_steps}; got lr_cycle_steps={self.lr_cycle_steps}")
            factor = lambda step: repeated_cosine(step, self.lr_cycle_steps, self.warmup_steps, self.min_lr_ratio)
        elif self.lr_schedule == "step":
            total = int(self.trainer.estimated_stepping_batches)
            factor = lambda step: warmup_step(step, total, self.warmup_steps, self.lr_milestones, self.lr_gamma)
        elif self.lr_schedule == "cosine":
            total = int(self.trainer.estimated_stepping_batches)
            factor = lambda step: warmup_cosine(step, total, self.warmup_steps, self.cosine_cycles)
        else:
            raise ValueError(f"unknown lr_schedule {self.lr_schedule!r}; use cosine, step, constant, infinite or "
                             f"repeated_cosine")
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # -------------------------------------------------------------- teachers
    def teachers(self) -> dict[str, Teacher]:
        """Every teacher of this module by attribute path (``ema``, FST's ``teacher``, ...): the submodules that are
        a :class:`~zoo.core.teacher.Teacher`, so a paper declares nothing. The experiment sweep checks each one."""
        return {name: module for name, module in self.named_modules() if isinstance(module, Teacher)}

    def ema_decay_at(self, step: int) -> float:
        """Decay used at optimizer step ``step``; papers with a teacher schedule override this."""
        return self.ema_decay

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:
            self.ema.update(self.network, self.ema_decay_at(self.global_step))
