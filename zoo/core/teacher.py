"""Teachers: networks a method learns from without training them, each with the one rule it may move by.

Every teacher/student pair in the zoo is one of two kinds:

- :class:`EMATeacher`, a frozen deep copy that moves only through :meth:`EMATeacher.update`,
  ``t <- t + (1 - decay) (source - t)``. Used for the base's ``self.ema`` (FixMatch, mean teachers, DAFormer),
  for FST's look-ahead teacher (updated inside the step, sometimes towards an average of virtual students), for
  CT's teacher (which runs dropout: ``train_mode``), and for the momentum encoders of BYOL/MoCo-style methods (an
  ``EMATeacher`` of the encoder + projector, e.g. of an ``nn.ModuleList([encoder, projector])``).
- :class:`StopGradTeacher`, the student itself run under ``torch.no_grad()`` (iCT). It has no state of its own.

``ZooModule.teachers()`` finds every teacher among a module's submodules, and the experiment sweep checks on every
step that each one moved only by its rule (``tests/helpers.py::StepChecker``).
"""
from __future__ import annotations

import copy
from typing import Iterable, Literal

import torch
import torch.nn as nn

__all__ = ["Teacher", "EMATeacher", "StopGradTeacher"]


class Teacher(nn.Module):
    """A teacher is called like the network it runs, ``module``."""

    module: nn.Module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


class EMATeacher(Teacher):
    """An exponential moving average of a network: a frozen copy, saved in every checkpoint (``<name>.module.*``).

    Args:
        network: the student; the teacher starts as a deep copy of it.
        buffers: when updated from a network, BatchNorm statistics are copied from it (``"copy"``: FixMatch, USB)
            or averaged like the parameters (``"average"``: mean-teacher style). Integer buffers are always copied.
        train_mode: follow the owner's train/eval mode, so that the teacher applies dropout in training (CT's
            teacher). By default the average always runs in eval mode.
    """

    def __init__(self, network: nn.Module, buffers: Literal["copy", "average"] = "copy", train_mode: bool = False):
        super().__init__()
        if buffers not in ("copy", "average"):
            raise ValueError(f"buffers must be 'copy' or 'average', got {buffers!r}")
        self.module = copy.deepcopy(network).requires_grad_(False)
        self.buffers_mode, self.train_mode = buffers, train_mode
        self.train(False)

    def train(self, mode: bool = True):
        return super().train(mode and self.train_mode)

    @torch.no_grad()
    def update(self, source: nn.Module | Iterable[torch.Tensor], decay: float) -> None:
        """``t <- decay * t + (1 - decay) * source``, the only way the teacher's parameters move.

        ``source`` is the student network (parameters, then buffers by ``buffers``), or tensors in the order of the
        teacher's parameters (parameters only, buffers untouched: FST's updates, as the official ``_update_ema``).
        """
        teacher = list(self.module.parameters())
        targets = [t.detach() for t in (source.parameters() if isinstance(source, nn.Module) else source)]
        if len(targets) != len(teacher):
            raise ValueError(f"the teacher has {len(teacher)} parameter tensors, the source {len(targets)}")
        torch._foreach_lerp_(teacher, targets, 1.0 - decay)
        if isinstance(source, nn.Module):
            for mine, theirs in zip(self.module.buffers(), source.buffers()):
                if self.buffers_mode == "average" and mine.dtype.is_floating_point:
                    mine.lerp_(theirs, 1.0 - decay)
                else:
                    mine.copy_(theirs)


class StopGradTeacher(Teacher):
    """The student itself with a stopped gradient: its current weights, run under ``torch.no_grad()`` (iCT).

    The student is held as a plain reference, not registered as a submodule, so its weights appear once in the
    state dict and ``.to()`` moves them once; this teacher has no parameters or buffers of its own.
    """

    def __init__(self, student: nn.Module):
        super().__init__()
        object.__setattr__(self, "_student", student)  # bypasses nn.Module's registration of submodules

    @property
    def module(self) -> nn.Module:
        return self._student

    def forward(self, *args, **kwargs):
        with torch.no_grad():
            return self.module(*args, **kwargs)
