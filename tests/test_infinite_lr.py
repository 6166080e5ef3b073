"""infinite_lr: the schedules against the paper's formulas computed independently here (no official code was found;
Ibrahim et al. 2024 / Singh et al. 2025 eq. for inf-cos, the repeated cosine of their baseline), MAE's masking and
loss (He et al., 2022) against direct computations, and a short continual run whose training is unchanged by the
task-matrix evaluation and its anneal on a copy."""
from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn as nn

from zoo.continual.data import TaskStreamDataModule
from zoo.continual.evaluation import TaskMatrix
from zoo.core.module import ZooModule, infinite_cosine, repeated_cosine
from zoo.infinite_lr.module import InfiniteLRMAE, MaskedAutoencoder, masked_patch_loss, patchify, random_masking

ETA_MAX, ETA_CONST, N_W, N_CD = 1e-3, 1e-4, 10, 30


def inf_cos_reference(n: int) -> float:
    """The paper's inf-cos at update n = step + 1 (the base counts the first update as 1/N_w of the warm-up)."""
    if n <= N_W:
        return ETA_MAX * n / N_W
    if n <= N_W + N_CD:
        return ETA_CONST + (ETA_MAX - ETA_CONST) * (1 + np.cos(np.pi * (n - 1 - N_W) / N_CD)) / 2
    return ETA_CONST


def lr_of(step: int) -> float:
    return ETA_MAX * infinite_cosine(step, N_W, N_CD, ETA_CONST / ETA_MAX)


# ---------------------------------------------------------------------------------------------- schedules
@pytest.mark.parametrize("step", [0, 4, N_W - 1, N_W, N_W + 1, N_W + N_CD // 2, N_W + N_CD - 1, N_W + N_CD, 10**9])
def test_infinite_schedule_matches_the_formula_at_its_phase_boundaries(step):
    assert lr_of(step) == pytest.approx(inf_cos_reference(step + 1), rel=1e-12)


def test_infinite_schedule_is_continuous_and_then_constant_for_ever():
    lrs = np.array([lr_of(s) for s in range(N_W - 1, N_W + N_CD + 50)])
    assert np.abs(np.diff(lrs)).max() <= ETA_MAX * math.pi / (2 * N_CD) + 1e-12  # no jump: at most the cosine's slope
    assert lrs[0] == pytest.approx(ETA_MAX) and lrs[1] == pytest.approx(ETA_MAX)  # warm-up meets the cool-down
    assert all(lr_of(s) == pytest.approx(ETA_CONST, rel=1e-12) for s in (N_W + N_CD, 10**4, 10**7, 10**12))
    assert lr_of(N_W + N_CD // 2) == pytest.approx((ETA_MAX + ETA_CONST) / 2)


def test_repeated_cosine_rewarms_at_every_task_boundary():
    cycle, warmup, low = 105, 5, 0.01
    for task in range(4):
        start = task * cycle
        assert repeated_cosine(start, cycle, warmup, low) == pytest.approx(1 / warmup)  # back to the warm-up
        assert repeated_cosine(start + warmup - 1, cycle, warmup, low) == pytest.approx(1.0)
        end = repeated_cosine(start + cycle - 1, cycle, warmup, low)
        expected = low + (1 - low) * (1 + np.cos(np.pi * (cycle - 1 - warmup) / (cycle - warmup))) / 2
        assert end == pytest.approx(expected) and end < low + 1e-3  # decayed to ~eta_min at the task's end
    middle = repeated_cosine(warmup + (cycle - warmup) // 2, cycle, warmup, low)
    assert middle == pytest.approx(low + (1 - low) / 2)


def _base(**kwargs) -> ZooModule:
    return ZooModule(nn.Linear(2, 2), optimizer="adamw", lr=ETA_MAX, ema_decay=None, **kwargs)


def test_the_base_module_drives_the_optimiser_with_the_new_schedules():
    config = _base(lr_schedule="infinite", warmup_steps=N_W, cooldown_steps=N_CD,
                   constant_lr_ratio=ETA_CONST / ETA_MAX).configure_optimizers()
    opt, schedule = config["optimizer"], config["lr_scheduler"]["scheduler"]
    seen = []
    for _ in range(N_W + N_CD + 5):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        schedule.step()
    assert seen == pytest.approx([inf_cos_reference(s + 1) for s in range(len(seen))], rel=1e-9)

    config = _base(lr_schedule="repeated_cosine", warmup_steps=2, lr_cycle_steps=6).configure_optimizers()
    opt, schedule = config["optimizer"], config["lr_scheduler"]["scheduler"]
    seen = []
    for _ in range(12):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        schedule.step()
    assert seen[:6] == pytest.approx(seen[6:]) and seen[6] == pytest.approx(ETA_MAX / 2)
    with pytest.raises(ValueError, match="lr_cycle_steps"):
        _base(lr_schedule="repeated_cosine").configure_optimizers()


# ---------------------------------------------------------------------------------------------- MAE
def test_masking_hides_exactly_the_ratio_and_keeps_the_unmasked_tokens():
    torch.manual_seed(0)
    tokens = torch.randn(3, 64, 5)
    kept, mask, restore = random_masking(tokens, 0.75)
    assert kept.shape == (3, 16, 5)
    assert (mask.sum(1) == 48).all() and set(mask.unique().tolist()) == {0.0, 1.0}
    for n in range(3):  # the kept tokens are exactly the unmasked ones, in shuffled order
        visible = tokens[n][mask[n] == 0]
        assert sorted(map(tuple, visible.tolist())) == sorted(map(tuple, kept[n].tolist()))
    # the decoder's un-shuffle puts each kept token back at its own position and the mask tokens at the hidden ones
    unshuffled = torch.gather(torch.cat([kept, torch.zeros(3, 48, 5)], 1), 1, restore[..., None].expand(-1, -1, 5))
    assert torch.equal(unshuffled[mask == 0], tokens[mask == 0]) and not unshuffled[mask == 1].any()


def test_patchify_is_row_major_with_pixels_inside():
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    patches = patchify(images, 4)
    assert patches.shape == (2, 4, 48)
    # patch 1 = rows 0..3, columns 4..7; its element (row 1, col 2, channel 2)
    assert patches[0, 1, (1 * 4 + 2) * 3 + 2] == images[0, 2, 1, 6]


def test_loss_reads_masked_patches_only_against_normalised_targets():
    torch.manual_seed(0)
    target = torch.rand(2, 6, 12) * 5 + 3
    mask = torch.tensor([[1, 0, 1, 0, 0, 1], [0, 1, 1, 1, 0, 0]], dtype=torch.float32)
    normalised = (target - target.mean(-1, keepdim=True)) / torch.sqrt(target.var(-1, unbiased=False, keepdim=True)
                                                                         + 1e-6)
    assert masked_patch_loss(normalised, target, mask) == pytest.approx(0.0, abs=1e-10)
    prediction = torch.randn(2, 6, 12)
    loss = masked_patch_loss(prediction, target, mask)
    by_hand = sum(((prediction[n, p] - normalised[n, p]) ** 2).mean() for n in range(2) for p in range(6)
                  if mask[n, p]) / mask.sum()
    assert loss == pytest.approx(float(by_hand), rel=1e-6)
    visible_changed = prediction + (1 - mask)[..., None] * 100
    assert masked_patch_loss(visible_changed, target, mask) == loss
    unnormalised = masked_patch_loss(prediction, target, mask, norm_pix=False)
    assert unnormalised == pytest.approx(float(((prediction - target) ** 2).mean(-1)[mask.bool()].mean()), rel=1e-6)


def test_mae_gradients_reach_every_parameter_and_features_see_all_tokens():
    torch.manual_seed(0)
    mae = MaskedAutoencoder(img_size=16, patch_size=4, embed_dim=16, depth=1, num_heads=2, decoder_embed_dim=8,
                            decoder_depth=1)
    module = InfiniteLRMAE(mae)
    images = torch.randn(4, 3, 16, 16)
    module.objective(mae, {"image": images}).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mae.parameters())
    mae.eval()
    assert torch.equal(mae.features(images), mae.features(images))  # no masking: deterministic
    with pytest.raises(ValueError, match="mask_ratio"):
        InfiniteLRMAE(mae, mask_ratio=1.0)


# ---------------------------------------------------------------------------------------------- a continual run
def _continual_run(tmp_path, callbacks) -> dict:
    L.seed_everything(0)
    mae = MaskedAutoencoder(img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2, decoder_embed_dim=8,
                            decoder_depth=1)
    module = InfiniteLRMAE(mae, warmup_steps=1, cooldown_steps=1, lr=1e-3)
    dm = TaskStreamDataModule(dataset="digits", num_tasks=2, steps_per_task=3, batch_size=8, steps_per_epoch=2,
                              num_workers=0, eval_batch_size=256)
    trainer = L.Trainer(max_steps=6, logger=False, enable_checkpointing=False, limit_val_batches=0,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
                        default_root_dir=str(tmp_path), accelerator="cpu", devices=1)
    trainer.fit(module, datamodule=dm)
    return {k: v.clone() for k, v in module.network.state_dict().items()}


def test_task_matrix_and_anneal_on_a_copy_leave_training_unchanged(tmp_path):
    plain = _continual_run(tmp_path / "plain", [])
    matrix = TaskMatrix(probe="knn", anneal_steps=2)
    annealed = _continual_run(tmp_path / "annealed", [matrix])
    for name, value in plain.items():
        assert torch.equal(value, annealed[name]), name
    saved = json.loads((tmp_path / "annealed" / "task_matrix.json").read_text())
    assert [len(row) for row in saved["accuracy"]] == [1, 2] and saved["anneal_steps"] == 2
    assert saved["average_accuracy"][1] == pytest.approx(np.mean(saved["accuracy"][1]))
    assert saved["forgetting"] == [0.0, pytest.approx(saved["accuracy"][0][0] - saved["accuracy"][1][0])]
    # the annealed copy is what was evaluated: its loss differs from the training weights' at the same point
    untouched = TaskMatrix(probe="knn", anneal_steps=0)
    _continual_run(tmp_path / "as_trained", [untouched])
    assert untouched.loss[0] != matrix.loss[0]


def test_a_continual_run_resumes_exactly_across_a_task_end():
    """Interrupted one step after the first task's end (its matrix row in the checkpoint) and rerun: the same batches,
    weights, AdamW state and schedule as a straight run, and the same task matrix (tests/test_resume.py's check)."""
    from test_resume import Case, assert_same_state, run_straight_and_interrupted

    tiny = ("embed_dim=16", "depth=1", "num_heads=2", "decoder_embed_dim=8", "patch_size=8")
    case = Case("infinite_lr_cifar10_subset_inf_cos", 6, 4, (
        "--data.init_args.steps_per_task=3", "--data.init_args.steps_per_epoch=2", "--data.init_args.batch_size=8",
        "--data.init_args.num_tasks=2", "--model.init_args.warmup_steps=1", "--model.init_args.cooldown_steps=1",
        *(f"--model.init_args.network.init_args.{a}" for a in tiny)))
    straight, resumed = run_straight_and_interrupted(case)
    assert resumed.batches == straight.batches[case.interrupt_at:]
    assert_same_state(straight.state, resumed.state, case.steps)
    matrices = [json.loads(Path("runs", name, "task_matrix.json").read_text()) for name in ("straight", "resumed")]
    assert len(matrices[0]["accuracy"]) == 2 and matrices[0] == matrices[1]
