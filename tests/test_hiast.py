"""HIAST: parity of the instance adaptive selector, the hard-class sampling and copy-paste and the region-adaptive
losses against the official functions, and the module on CamVid (and the paper setting on its stand-ins).

Reference constants come from RUNNING the official functions: bupt-ai-cz/HIAST @ f2f357aaa024b8f7595632a1f95785617787bc37,
script /tmp/hiast_ref/run_ref.py (kept out of the repo). It execs the official files with stubbed imports
(registries, model builders, cv2, tqdm, albumentations; ``np.bool = bool`` for ``run_original`` on NumPy 2) and runs,
on the inputs rebuilt below: the loop body of ``IASPseudoGenerator.run`` (its ``get_ias_threshold``, the beta
momentum and the 0.999 cap) and ``BasePseudoGenerator.select_and_save_confident_label`` (pseudo-labels and class
mean probabilities) for 3 batches (``workflows/pseudo_label_generator.py``); ``CopyPaste.get_hard_classes``,
``calculate_class_probs`` and ``run_original`` with a one-image dataset (``sseg/datasets/preprocessor.py``);
``BaseDataset.stat_samples_with_class`` (``sseg/datasets/loader/base_dataset.py``); ``SelfTrainingSegmentor.compute_loss``
with ``_kld``, ``_entropy``, ``build_region_weight`` and ``losses.ce`` / ``losses.soft_ce`` at the sl_1 + hiast_setting
weights (``sseg/models/segmentors/self_training_segmentor.py``, ``sseg/models/modules/losses.py``).
"""
from __future__ import annotations

import inspect
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import StepChecker, build
from zoo.segda.data import IGNORE
from zoo.hiast.module import HIAST
from zoo.hiast.rules import (choose_paste_source, hard_aware_copy_paste, hard_classes_and_probabilities, ias_thresholds,
                             region_adaptive_losses, select_pseudo_labels, update_class_values)

ROOT = Path(__file__).resolve().parents[1]

# --- constants printed by /tmp/hiast_ref/run_ref.py (official code) ---
IAS_THRESHOLDS = [[0.8983729979395867, 0.8956386199593545, 0.8884120559692383, 0.8897329023480416, 0.8999999961256981],
                  [0.8932336525022985, 0.8860477701723576, 0.8865366944074632, 0.8899690569341183, 0.8999999926388265],
                  [0.8853785266786814, 0.8819723334223032, 0.8874880136609079, 0.8852649057716132, 0.899999989500642]]
IAS_CLASS_VALUES = [[0.9436507821083069, 0.948913037776947, 0.9436507821083069, 0.9383885264396667, 0.0],
                    [0.943441268876195, 0.9487427480891347, 0.9437560261040926, 0.9384336955100298, 0.0],
                    [0.9434309419162571, 0.9487712515067309, 0.9438527652166784, 0.9385260668031871, 0.0]]
IAS_IGNORED_PER_IMAGE = [[42, 42], [40, 41], [42, 41]]
IAS_KEPT_LABEL_SUM = [[11, 5], [14, 12], [6, 13]]
IAS_CAP_CASE = [0.999, 0.8956995359063149, 0.5099706657230854, 0.3000000011920929, 0.9965792167544365]
HARD_CLASSES = [1, 5, 2, 6]
CLASS_PROBS = [0.0017131501404783144, 0.6852600561913246, 0.09895155211402727, 0.024737888028506804,
               0.0006167340505721932, 0.1387651613787432, 0.04995545809634757]
PASTED_LABEL = [[3, 3, 2, 3, 3, 5], [6, 3, 1, 2, 3, 3], [5, 6, 255, 1, 2, 255], [255, 5, 6, 255, 1, 2]]
PASTED_IMAGE_0 = [[200, 200, 6, 200, 200, 15], [18, 200, 24, 27, 200, 200], [36, 39, 200, 45, 48, 200],
                  [200, 57, 60, 200, 66, 69]]
HOLDER_COUNTS = [40, 7, 300, 12, 95, 3, 64, 150, 22, 5, 80, 18]
HOLDERS_KEPT = [9, 1, 3, 11, 8, 0, 6, 10, 4, 7, 2]  # img5 (3 pixels) dropped
LOSSES = {"ce": 2.9821105003356934, "kl": 0.7296807169914246, "entropy": 0.16515763103961945,
          "consistency": 0.6447362303733826}
WEIGHTED_TOTAL = 2.9821105003356934 + 0.07296807318925858 + 0.16515763103961945 + 0.3223681151866913


def ias_batch(step: int):
    k = np.arange(96) + 37 * step
    confidence = torch.from_numpy((0.2 + 0.8 * ((k * 0.6180339887498949) % 1.0)).astype(np.float32).reshape(2, 6, 8))
    return confidence, torch.from_numpy(((k * 7 + step) % 4).reshape(2, 6, 8))


def test_ias_thresholds_pseudo_labels_and_class_values_match_official():
    thresholds, values = torch.full((5,), 0.9, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)
    for step in range(3):
        confidence, labels = ias_batch(step)
        thresholds = ias_thresholds(thresholds, confidence, labels, alpha=0.5, beta=0.9, gamma=8.0)
        pseudo = select_pseudo_labels(confidence, labels, thresholds)
        values = update_class_values(values, confidence, pseudo, momentum=0.99)
        np.testing.assert_allclose(thresholds.numpy(), IAS_THRESHOLDS[step], rtol=0, atol=1e-7)
        np.testing.assert_allclose(values.numpy(), IAS_CLASS_VALUES[step], rtol=0, atol=1e-7)
        assert (pseudo == IGNORE).sum((1, 2)).tolist() == IAS_IGNORED_PER_IMAGE[step]
        assert [int(p[p != IGNORE].sum()) for p in pseudo] == IAS_KEPT_LABEL_SUM[step]


def test_ias_cap_matches_official():
    thresholds = torch.tensor([1.0, 0.9, 0.5, 0.3, 0.999], dtype=torch.float64)
    confidence = torch.tensor([0.99999, 0.99997, 0.7, 0.6, 0.95, 0.2])
    updated = ias_thresholds(thresholds, confidence, torch.tensor([0, 0, 1, 2, 4, 2]))
    np.testing.assert_allclose(updated.numpy(), IAS_CAP_CASE, rtol=0, atol=1e-7)


def test_hard_classes_and_probabilities_match_official():
    values = torch.tensor([0.95, 0.0, 0.62, 0.81, 0.97, 0.55, 0.73], dtype=torch.float64)
    hard, probabilities = hard_classes_and_probabilities(values, 4)
    assert hard.tolist() == HARD_CLASSES
    expected = np.array(CLASS_PROBS)[HARD_CLASSES]  # rejection sampling until a hard class = renormalised
    np.testing.assert_allclose(probabilities.numpy(), expected / expected.sum(), rtol=1e-12)


def test_copy_paste_matches_official():
    source_label = torch.arange(24).reshape(4, 6) % 7
    source_label[0, :2] = IGNORE
    source_image = torch.stack([torch.arange(24).reshape(4, 6) * 3 + ch for ch in range(3)])
    target_label = torch.full((4, 6), 3)
    target_label[2:] = IGNORE
    hard, probabilities = hard_classes_and_probabilities(
        torch.tensor([0.95, 0.0, 0.62, 0.81, 0.97, 0.55, 0.73], dtype=torch.float64), 4)
    image, label = hard_aware_copy_paste(torch.full((3, 4, 6), 200), target_label, source_image[None],
                                         source_label[None], hard, probabilities)
    assert label.tolist() == PASTED_LABEL
    assert image[0].tolist() == PASTED_IMAGE_0


def test_paste_source_drops_the_holders_with_fewest_pixels_as_official():
    bank = torch.zeros(12, 20, 20, dtype=torch.long) + 1
    for i, n in enumerate(HOLDER_COUNTS):
        bank[i].view(-1)[:n] = 0
    g = torch.Generator().manual_seed(0)
    drawn = {choose_paste_source(bank, torch.tensor([0]), torch.tensor([1.0]), 0.1, g) for _ in range(300)}
    assert drawn == set(HOLDERS_KEPT)
    assert choose_paste_source(bank, torch.tensor([2, 3]), torch.tensor([0.5, 0.5])) is None


def test_hard_class_draw_follows_the_probabilities():
    bank = torch.stack([torch.full((4, 4), c) for c in range(3)])  # image c holds only class c
    hard, probabilities = torch.tensor([0, 1, 2]), torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    draws = torch.tensor([choose_paste_source(bank, hard, probabilities, 0.0, g) for _ in range(3000)])
    np.testing.assert_allclose(torch.bincount(draws, minlength=3).numpy() / 3000, [0.6, 0.3, 0.1], atol=0.03)


def test_paper_loop_pastes_until_half_the_hard_classes_are_present():
    bank = torch.full((4, 4, 4), IGNORE)  # bank image c holds class c in row c only
    for c in range(4):
        bank[c, c] = c
    hard, probabilities = torch.tensor([0, 1, 2, 3]), torch.full((4,), 0.25, dtype=torch.float64)
    target = torch.full((4, 4), 9)
    _, one = hard_aware_copy_paste(torch.zeros(3, 4, 4), target, bank.float()[:, None].expand(-1, 3, -1, -1), bank,
                                   hard, probabilities, max_images=1)
    _, loop = hard_aware_copy_paste(torch.zeros(3, 4, 4), target, bank.float()[:, None].expand(-1, 3, -1, -1), bank,
                                    hard, probabilities, max_images=3)
    assert len(set(one.unique().tolist()) - {9}) == 1  # the official code: one source image
    assert len(set(loop.unique().tolist()) - {9}) == 2  # the paper: until half of the 4 hard classes are there
    assert (one == 9).sum() == 12 and (loop == 9).sum() == 8  # ignored source pixels are never pasted


def region_inputs():
    logits = (3 * torch.sin(torch.arange(120, dtype=torch.float64) * 0.7)).float().reshape(2, 4, 3, 5)
    teacher = torch.softmax((2 * torch.cos(torch.arange(120, dtype=torch.float64) * 0.3)).float().reshape(2, 4, 3, 5), 1)
    j = torch.arange(30)
    return logits, torch.where(j % 3 == 0, torch.tensor(IGNORE), j % 4).reshape(2, 3, 5), teacher


def test_region_adaptive_losses_match_official():
    logits, labels, teacher = region_inputs()
    terms = region_adaptive_losses(logits, labels, teacher)
    for name, expected in LOSSES.items():
        assert terms[name].item() == pytest.approx(expected, rel=1e-6), name
    defaults = inspect.signature(HIAST).parameters
    total = sum(defaults[f"{name}_weight"].default * term for name, term in terms.items())
    assert total.item() == pytest.approx(WEIGHTED_TOTAL, rel=1e-6)


def test_empty_regions_give_zero_and_the_losses_have_gradients():
    logits, labels, teacher = region_inputs()
    logits.requires_grad_(True)
    all_ignored = region_adaptive_losses(logits, torch.full_like(labels, IGNORE), teacher)
    none_ignored = region_adaptive_losses(logits, labels.clamp(max=3), teacher)
    assert all_ignored["ce"] == 0 and all_ignored["kl"] == 0 and none_ignored["entropy"] == 0
    assert none_ignored["consistency"] == 0 and math.isfinite(all_ignored["consistency"].item())
    sum(all_ignored.values()).backward()
    assert logits.grad.abs().sum() > 0


def test_defaults_are_the_official_constants():
    p = {k: v.default for k, v in inspect.signature(HIAST).parameters.items()}
    assert (p["ias_alpha"], p["ias_beta"], p["ias_gamma"], p["ias_init"], p["ias_cap"]) == (0.5, 0.9, 8.0, 0.9, 0.999)
    assert (p["class_value_momentum"], p["hard_classes"], p["max_paste_images"], p["paste_drop_fraction"]) == (
        0.99, 14, 1, 0.1)
    assert (p["ce_weight"], p["kl_weight"], p["entropy_weight"], p["consistency_weight"]) == (1.0, 0.1, 1.0, 0.5)


def test_module_labels_pastes_and_moves_the_selector(tmp_path):
    # a random-init teacher is ~1/11 confident: a low initial threshold keeps pixels within 3 steps, and with every
    # class hard the few classes kept so far all qualify for pasting
    cli = build(ROOT / "experiments" / "hiast_camvid_day_dusk.yaml", tmp_path, "--model.init_args.hard_classes=11",
                "--model.init_args.ias_init=0.05")
    teacher_inputs, checker = [], StepChecker()
    cli.model.ema.module.register_forward_pre_hook(
        lambda module, args: teacher_inputs.append(args[0].detach().clone()) if cli.trainer.training else None)
    cli.trainer.callbacks.append(checker)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    model = cli.model
    assert checker.steps == 3 and not checker.missing_grads and max(checker.ema_errors) < 1e-6
    assert len(teacher_inputs) == 6  # per step: the target crops (IAS), then the copy-pasted crops (consistency)
    assert len(model.bank_labels) == 3 * len(teacher_inputs[0]) and (model.bank_labels != IGNORE).any()
    assert torch.equal(model.bank_images[-len(teacher_inputs[0]):], teacher_inputs[-2])
    assert not torch.equal(teacher_inputs[-1], teacher_inputs[-2])  # hard-class pixels were pasted
    assert (model.class_thresholds != 0.05).any() and (model.class_values > 0).any()
    assert "class_thresholds" in model.state_dict() and "class_values" in model.state_dict()
    assert {"train/consistency_loss", "train/entropy_loss", "train/kl_loss", "train/ce_loss"} <= set(
        cli.trainer.logged_metrics)
