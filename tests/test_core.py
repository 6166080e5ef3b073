"""Units of the common base: samplers, labeled split, teachers, optimiser groups, LR schedule, W&B offline run."""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from zoo.core.cli import ZooCLI
from zoo.core.data import FixedLengthSampler
from zoo.semisup.data import sample_labeled_indices
from zoo.core.module import ZooModule, param_groups, warmup_cosine, warmup_step
from zoo.core.nets import SmallCNN, WideResNet
from zoo.core.teacher import EMATeacher, StopGradTeacher

ROOT = Path(__file__).resolve().parents[1]


def test_sampler_shards_are_disjoint_and_form_the_global_batch():
    single = FixedLengthSampler(50, 120, seed=3)
    shards = [FixedLengthSampler(50, 120, seed=3, rank=r, world_size=4) for r in range(4)]
    for s in [single, *shards]:
        s.set_epoch(2)
    draws = list(single)
    per_rank = [list(s) for s in shards]
    assert all(len(p) == 30 for p in per_rank)
    for step in range(120 // 24):  # global batch 24 = 4 ranks x 6
        union = sorted(x for p in per_rank for x in p[step * 6:(step + 1) * 6])
        assert union == sorted(draws[step * 24:(step + 1) * 24])


def test_sampler_epochs_differ_and_fast_forward_skips_exactly():
    s = FixedLengthSampler(40, 64, seed=0)
    s.set_epoch(0)
    first = list(s)
    s.set_epoch(1)
    assert list(s) != first
    assert sorted(i for i, _ in first[:40]) == list(range(40))  # each permutation covers the data once
    s.set_epoch(0)
    s.fast_forward(10)
    assert list(s) == first[10:]
    assert list(s) == first  # the skip is one-shot


def test_labeled_split_is_balanced_and_seeded():
    labels = np.repeat(np.arange(10), 30)
    a = sample_labeled_indices(labels, 40, 10, seed=0)
    assert np.bincount(labels[a]).tolist() == [4] * 10
    assert (a == sample_labeled_indices(labels, 40, 10, seed=0)).all()
    assert (a != sample_labeled_indices(labels, 40, 10, seed=1)).any()
    with pytest.raises(ValueError):
        sample_labeled_indices(labels, 45, 10, seed=0)


def test_ema_parameters_follow_lerp_and_buffers_follow_their_mode():
    net = SmallCNN(width=4)
    for mode in ("copy", "average"):
        ema = EMATeacher(net, buffers=mode)
        before = [p.clone() for p in ema.module.parameters()]
        buf_before = [b.clone() for b in ema.module.buffers()]
        with torch.no_grad():
            for p in net.parameters():
                p.add_(1.0)
            for b in net.buffers():
                b.add_(2) if b.is_floating_point() else b.add_(1)
        ema.update(net, 0.9)
        for b0, e, p in zip(before, ema.module.parameters(), net.parameters()):
            torch.testing.assert_close(e, 0.9 * b0 + 0.1 * p)
        for b0, e, b in zip(buf_before, ema.module.buffers(), net.buffers()):
            expected = 0.9 * b0 + 0.1 * b if (mode == "average" and b.is_floating_point()) else b
            torch.testing.assert_close(e, expected)
        assert not any(p.requires_grad for p in ema.module.parameters())
        ema.train()
        assert not ema.module.training


def test_ema_teacher_from_tensors_moves_parameters_only_and_train_mode_follows_the_owner():
    net = SmallCNN(width=4)
    teacher = EMATeacher(net, train_mode=True)
    before, buffers = [p.clone() for p in teacher.module.parameters()], [b.clone() for b in teacher.module.buffers()]
    target = [p.detach() + 1.0 for p in net.parameters()]  # e.g. FST's average of virtual students
    with torch.no_grad():
        for b in net.buffers():
            b.add_(1)
    teacher.update(target, 0.75)
    for b0, t, s in zip(before, teacher.module.parameters(), target):
        torch.testing.assert_close(t, 0.75 * b0 + 0.25 * s)
    assert all(torch.equal(b0, b) for b0, b in zip(buffers, teacher.module.buffers()))
    with pytest.raises(ValueError, match="parameter tensors"):
        teacher.update(target[:-1], 0.75)
    assert not teacher.module.training  # starts in eval mode, then follows its owner (CT's dropout-running teacher)
    teacher.train()
    assert teacher.module.training


class _WithTeachers(ZooModule):
    def __init__(self):
        super().__init__(SmallCNN(width=4), ema_decay=0.99)
        self.student_copy = StopGradTeacher(self.network)


def test_teachers_are_found_and_the_stopgrad_teacher_has_no_state_of_its_own():
    module = _WithTeachers()
    teachers = module.teachers()
    assert set(teachers) == {"ema", "student_copy"} and isinstance(teachers["ema"], EMATeacher)
    stopgrad = teachers["student_copy"]
    assert stopgrad.module is module.network and not list(stopgrad.parameters()) and not stopgrad.state_dict()
    assert not any(k.startswith("student_copy") for k in module.state_dict())
    x = torch.randn(2, 3, 8, 8)
    module.eval()
    out = stopgrad(x)
    assert out.grad_fn is None and torch.equal(out, module.network(x))  # the student's current weights


def test_no_weight_decay_on_biases_and_norms():
    net = WideResNet()
    decay, no_decay = param_groups(net, 5e-4)
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0
    ids = {id(p) for p in no_decay["params"]}
    for module in net.modules():
        for name, p in module.named_parameters(recurse=False):
            is_norm_or_bias = isinstance(module, nn.BatchNorm2d) or name == "bias"
            assert (id(p) in ids) == is_norm_or_bias
    assert sum(p.numel() for p in net.parameters()) == 1_467_626  # USB's wrn_28_2
    (everything,) = param_groups(net, 1e-4, decay_norm_and_bias=True)  # plain SGD(model.parameters(), wd)
    assert everything["weight_decay"] == 1e-4 and len(everything["params"]) == len(list(net.parameters()))


def test_fixmatch_cosine_schedule():
    total = 1000
    for k in (0, 250, 999):  # lr = lr0 * cos(7 pi k / 16 K)
        assert math.isclose(warmup_cosine(k, total, 0, 7 / 16), math.cos(7 * math.pi * k / (16 * total)))
    assert warmup_cosine(4, total, 10, 0.5) == 0.5  # linear warm-up
    assert warmup_cosine(total, total, 0, 0.5) < 1e-12


def test_step_schedule_matches_multistep_lr():
    """``warmup_step`` with no warm-up is torch's ``MultiStepLR([K // 2, 3K // 4], 0.1)``, step for step."""
    total, opt = 80, torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    reference = torch.optim.lr_scheduler.MultiStepLR(opt, [total // 2, total * 3 // 4], 0.1)
    for step in range(total):
        assert math.isclose(warmup_step(step, total, 0, (0.5, 0.75), 0.1), opt.param_groups[0]["lr"], rel_tol=1e-9)
        opt.step()
        reference.step()
    assert warmup_step(2, total, 4, (0.5,), 0.1) == 0.75  # linear warm-up first


def test_wandb_offline_run_holds_the_logged_metrics(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    ZooCLI(args=["fit", "--config", str(ROOT / "experiments" / "fixmatch_digits.yaml"), "--run.name=wb",
                 "--trainer.max_steps=4", "--trainer.log_every_n_steps=1", "--trainer.limit_val_batches=2",
                 "--trainer.val_check_interval=null", "--trainer.check_val_every_n_epoch=1",
                 "--data.init_args.steps_per_epoch=4", "--data.init_args.batch_size=8",
                 "--data.init_args.uratio=2", "--data.init_args.num_workers=0", "--trainer.enable_progress_bar=false"])
    runs = list(Path("runs/wb/wandb").glob("offline-run-*"))
    assert len(runs) == 1
    keys = (b"train/loss", b"train/mask_ratio", b"val/acc", b"val/ema_acc", b"val/samples", b"git_commit",
            b"threshold")
    for _ in range(240):  # W&B's writer process may still be flushing the run file (slow on a loaded machine)
        records = b"".join(p.read_bytes() for p in runs[0].glob("*.wandb"))
        if all(key in records for key in keys):
            break
        time.sleep(0.5)
    for key in keys:
        assert key in records, key
