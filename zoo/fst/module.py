"""Learning from Future: A Novel Self-Training Framework for Semantic Segmentation (FST; Du et al., NeurIPS 2022).

The teacher that labels the target images is an EMA of *future* students: before the real update, the student
takes virtual optimizer steps, the teacher absorbs them, the student's parameters are restored, and only then are
the pseudo-labels for the real step produced. The host is DAFormer's self-training (``DAFormerSelfTraining``).

- FST-D (deep look-ahead): K times {EMA(teacher <- student); UDA loss with the teacher's labels; step}, one more
  EMA with the last virtual student, restore, real step.
- FST-W (wide look-ahead): K virtual steps from the same weights on K *other* batches (restoring between them),
  EMA(teacher <- average of the K results, a model soup), restore, real step, EMA(teacher <- real student).

Follows the official code (usr922/FST ``mmseg/models/uda/fst_d.py``, ``fst_w.py``), whose update order the tests
reproduce by running its ``train_step``: the momentum min(1 - 1/(n+1), alpha) counts *every* forward (K+1 per
real iteration: n = 1 + (r-1)(K+1) at the start of real iteration r >= 1); the first iteration is a plain step
followed by an EMA update with 0.5; only parameters are saved and restored, so the AdamW moments advance K+1
times per real iteration and BatchNorm statistics keep the virtual updates; the virtual steps share the real
step's learning rate; the teacher averages parameters only and is never restored. The teacher lives in
``self.teacher`` (an ``EMATeacher``, moved only by its ``update``) rather than the base's ``self.ema``: it moves
inside the step, not once after it. Virtual steps run a second backward inside ``training_step``, so this module
is single-process (the official code is too).
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn

from zoo.core.teacher import EMATeacher
from zoo.segda.host import DAFormerSelfTraining, ema_alpha

__all__ = ["FST", "forwards_before"]


def forwards_before(real_step: int, ahead_steps: int) -> int:
    """Forward passes (the official ``local_iter``) before real iteration ``real_step``."""
    return 0 if real_step == 0 else 1 + (real_step - 1) * (ahead_steps + 1)


class FST(DAFormerSelfTraining):
    """FST on DAFormer. Defaults: the official GTA->Cityscapes MiT-B5 config (``ahead_step=3``, FST-D).

    Args:
        network: segmentation network (``SegFormerDAFormer`` for the paper, ``SmallDAFormer`` on CPU).
        variant: ``deep`` (FST-D) or ``wide`` (FST-W; the data module must draw ``future_batches = ahead_steps``).
        ahead_steps: K, the number of virtual (future) steps per real step (3).
        The remaining arguments are the host's (see ``DAFormerSelfTraining``), with DAFormer's values.
    """

    def __init__(self, network: nn.Module, variant: Literal["deep", "wide"] = "deep", ahead_steps: int = 3, **host):
        super().__init__(network, **host)
        if variant not in ("deep", "wide"):
            raise ValueError(f"variant must be 'deep' or 'wide', got {variant!r}")
        self.variant, self.ahead_steps = variant, ahead_steps
        self.teacher = EMATeacher(network)  # moved inside the step: not the base's after-step EMA
        self.ema = None

    def teacher_network(self) -> nn.Module:
        return self.teacher.module

    def update_teacher(self, parameters, forwards: int) -> None:
        """teacher <- alpha teacher + (1 - alpha) parameters, with alpha from the forward count; tensors, not the
        network, so that only parameters move (the official ``_update_ema``)."""
        self.teacher.update(parameters, ema_alpha(forwards, self.alpha))

    def virtual_step(self, batch: dict) -> None:
        """One look-ahead step with the current teacher's labels, on the raw optimizer (no Lightning step count,
        no scheduler step: the virtual steps share the real step's learning rate)."""
        optimizer = self.optimizers().optimizer
        optimizer.zero_grad()
        super().training_step(batch, 0).backward()
        optimizer.step()

    def restore(self, saved: list[torch.Tensor]) -> None:
        with torch.no_grad():
            torch._foreach_copy_(list(self.network.parameters()), saved)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        chunks = {d: {k: v.chunk(self.ahead_steps + 1) if torch.is_tensor(v) else v for k, v in s.items()}
                  for d, s in batch.items()} if self.variant == "wide" else None
        real = batch if chunks is None else self._chunk(chunks, 0)
        if self.global_step == 0:  # official first iteration: a plain step (then EMA with 0.5, after the step)
            return super().training_step(real, batch_idx)
        forwards = forwards_before(self.global_step, self.ahead_steps)
        saved = [p.detach().clone() for p in self.network.parameters()]
        if self.variant == "deep":
            for k in range(self.ahead_steps):
                self.update_teacher(self.network.parameters(), forwards + k)
                self.virtual_step(real)
            self.update_teacher(self.network.parameters(), forwards + self.ahead_steps)
        else:
            soup = [torch.zeros_like(p) for p in saved]
            for k in range(self.ahead_steps):
                if k:
                    self.restore(saved)
                self.virtual_step(self._chunk(chunks, k + 1))
                torch._foreach_add_(soup, [p.detach() for p in self.network.parameters()])
            torch._foreach_div_(soup, self.ahead_steps)
            self.update_teacher(soup, forwards + self.ahead_steps)
        self.restore(saved)
        self.optimizers().optimizer.zero_grad()
        return super().training_step(real, batch_idx)

    @staticmethod
    def _chunk(chunks: dict, index: int) -> dict:
        return {d: {k: v[index] if isinstance(v, tuple) else v for k, v in s.items()} for d, s in chunks.items()}

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        step = self.global_step  # not yet advanced: the real iteration that just stepped
        if step == 0:
            self.update_teacher(self.network.parameters(), 1)
        elif self.variant == "wide":
            forwards = forwards_before(step, self.ahead_steps) + self.ahead_steps + 1
            self.update_teacher(self.network.parameters(), forwards)
