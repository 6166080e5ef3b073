"""Weak-to-strong: losses against the official code, the last-token head, the data split and the PGR driver."""
from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

from zoo.lm.heads import SequenceHead, confidence_coefficient, last_token_states, logconf_loss, product_loss, xent_loss
from zoo.weak_to_strong.pgr import performance_gap_recovered

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Fixed inputs and the values printed by openai/weak-to-strong @ 6b450f2cee3714d6f886e5e1910bac73633bf69a,
# weak_to_strong/loss.py (xent_loss, logconf_loss_fn, product_loss_fn), run on CPU with torch 2.14.1 in
# /tmp/w2s_ref: `loss_fn(aux_coef=..., warmup_frac=...)(LOGITS, WEAK, step_frac=...)` for each row below.
LOGITS = torch.tensor([[0.3, -1.2], [2.0, 0.5], [-0.7, 0.4], [1.1, 1.0], [0.0, -2.5], [-1.5, 1.5], [0.8, 0.2],
                       [0.1, 0.9]])
WEAK = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.55, 0.45], [0.7, 0.3], [0.05, 0.95], [0.4, 0.6],
                     [0.35, 0.65]])
OFFICIAL_XENT = 0.6032029986381531
OFFICIAL_LOGCONF = {  # (aux_coef, warmup_frac, step_frac) -> loss
    (0.5, 0.1, 0.0): 0.6032030582427979,
    (0.5, 0.1, 0.1): 0.5878593325614929,  # last warm-up step of the official schedule: coefficient 0.5 * 0.1
    (0.5, 0.1, 0.5): 0.44976556301116943,
    (0.5, 0.1, 1.0): 0.44976556301116943,
    (0.75, 0.2, 0.6): 0.37304678559303284,
    (0.25, 0.1, 0.5): 0.5264843106269836,  # coefficient 0.25
}
# weak labels with a class-1 rate of 0.78, so the adaptive threshold's quantile level matters
WEAK_SKEWED = torch.tensor([[0.1, 0.9], [0.3, 0.7], [0.2, 0.8], [0.15, 0.85], [0.6, 0.4], [0.05, 0.95], [0.25, 0.75],
                            [0.1, 0.9]])
OFFICIAL_LOGCONF_SKEWED = {(0.5, 0.1, 0.5): 0.6016406416893005, (1.0, 0.1, 1.0): 0.3713280260562897}
OFFICIAL_PRODUCT = {(1.0, 1.0): 0.3934696912765503, (0.5, 2.0): 0.34144946932792664}  # (alpha, beta)


def test_xent_matches_official():
    assert xent_loss(LOGITS, WEAK).item() == pytest.approx(OFFICIAL_XENT, abs=1e-6)


WARMUP_POINTS = ((0.25, 0.1, 0.5), (0.5, 0.1, 0.1))  # where the official coefficient is not the paper's linear ramp


@pytest.mark.parametrize("setting", [k for k in OFFICIAL_LOGCONF if k not in WARMUP_POINTS])
def test_logconf_matches_official_outside_warmup(setting):
    aux_coef, warmup_frac, step_frac = setting
    assert logconf_loss(LOGITS, WEAK, step_frac, aux_coef, warmup_frac).item() == pytest.approx(
        OFFICIAL_LOGCONF[setting], abs=1e-6)


@pytest.mark.parametrize("setting", list(OFFICIAL_LOGCONF_SKEWED))
def test_logconf_matches_official_with_skewed_weak_labels(setting):
    aux_coef, warmup_frac, step_frac = setting
    assert logconf_loss(LOGITS, WEAK_SKEWED, step_frac, aux_coef, warmup_frac).item() == pytest.approx(
        OFFICIAL_LOGCONF_SKEWED[setting], abs=1e-6)


def test_logconf_warmup_is_linear_in_step_over_warmup():
    # the paper's linear warm-up: halfway through a 0.1 warm-up alpha = 0.5 * 0.5 = 0.25, which the official loss
    # reaches with aux_coef 0.25 after its warm-up (the official warm-up itself would use 0.5 * 0.05 = 0.025)
    assert confidence_coefficient(0.05, 0.5, 0.1) == pytest.approx(0.25)
    assert logconf_loss(LOGITS, WEAK, 0.05, 0.5, 0.1).item() == pytest.approx(OFFICIAL_LOGCONF[(0.25, 0.1, 0.5)],
                                                                             abs=1e-6)
    # the official coefficient at step_frac 0.1 is 0.5 * 0.1 = 0.05, which the linear ramp reaches at step_frac 0.01
    assert logconf_loss(LOGITS, WEAK, 0.01, 0.5, 0.1).item() == pytest.approx(OFFICIAL_LOGCONF[(0.5, 0.1, 0.1)],
                                                                             abs=1e-6)


@pytest.mark.parametrize("alpha,beta", list(OFFICIAL_PRODUCT))
def test_product_matches_official(alpha, beta):
    assert product_loss(LOGITS, WEAK, alpha, beta).item() == pytest.approx(OFFICIAL_PRODUCT[(alpha, beta)], abs=1e-6)


def test_logconf_target_is_detached_and_hardened_balance_matches_weak():
    logits = LOGITS.clone().requires_grad_(True)
    loss = logconf_loss(logits, WEAK, 1.0, aux_coef=1.0, warmup_frac=0.1)  # target = hardened student only
    loss.backward()
    prob0 = torch.softmax(LOGITS, -1)[:, 0]
    threshold = torch.quantile(prob0, WEAK.mean(0)[1])
    hardened = torch.stack([prob0 >= threshold, prob0 < threshold], 1).float()
    # gradient of mean CE with a constant target is (softmax - target) / N: the target received no gradient
    expected = (torch.softmax(LOGITS, -1) - hardened) / len(LOGITS)
    torch.testing.assert_close(logits.grad, expected)
    assert hardened[:, 1].mean() == pytest.approx(0.5, abs=1 / len(LOGITS))  # weak class-1 rate is 0.5375


def test_last_token_states_left_and_right_padding():
    hidden = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 1, 1]])
    torch.testing.assert_close(last_token_states(hidden, right), hidden[[0, 1], [2, 4]])
    torch.testing.assert_close(last_token_states(hidden, left), hidden[[0, 1], [4, 4]])


def test_head_reads_last_real_token_and_ignores_padding():
    torch.manual_seed(0)
    model = SequenceHead("tiny-bert", num_outputs=2, zero_init=False, hidden_size=32, num_layers=1, num_heads=2).eval()
    ids = torch.tensor([[101, 2023, 2003, 102]])
    padded = torch.tensor([[101, 2023, 2003, 102, 0, 0, 0], [101, 7592, 102, 0, 0, 0, 0]])
    mask = (padded != 0).long()
    with torch.no_grad():
        alone = model(ids, torch.ones_like(ids))
        batched = model(padded, mask)
        garbage = model(padded.masked_fill(mask == 0, 999), mask)  # any token in the padded slots
    torch.testing.assert_close(batched[0], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(garbage, batched, atol=1e-5, rtol=1e-5)


def test_zero_initialised_head_gates_backbone_only_on_first_step():
    torch.manual_seed(0)
    model = SequenceHead("tiny-bert", num_outputs=2, hidden_size=32, num_layers=1, num_heads=2)
    ids, mask = torch.tensor([[101, 2023, 102], [101, 7592, 102]]), torch.ones(2, 3, dtype=torch.long)
    assert torch.equal(model(ids, mask), torch.zeros(2, 2))  # uniform predictions at the start
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(2):
        optimizer.zero_grad()
        xent_loss(model(ids, mask), torch.tensor([[1.0, 0.0], [0.0, 1.0]])).backward()
        backbone_grad = sum(p.grad.abs().sum() for p in model.backbone.parameters() if p.grad is not None)
        assert (backbone_grad == 0) == (step == 0)  # gated on step 0, trained from step 1 on
        optimizer.step()


def test_pgr_formula():
    assert performance_gap_recovered(0.8, 0.85, 0.9) == pytest.approx(0.5)
    assert performance_gap_recovered(0.8, 0.78, 0.9) == pytest.approx(-0.2)
    assert math.isnan(performance_gap_recovered(0.8, 0.85, 0.8))


def test_data_halves_are_disjoint_and_weak_labels_are_checked(tmp_path):
    from zoo.weak_to_strong.data import WeakToStrongDataModule

    dm = WeakToStrongDataModule(n_docs=40, n_test_docs=20)
    dm.setup()
    first = {tuple(x) for x in dm.train_set.input_ids}
    second = {tuple(x) for x in dm.half2_inputs.input_ids}
    test = {tuple(x) for x in dm.test_set.input_ids}
    assert len(dm.train_set) == len(dm.half2_inputs) == 20 and not (first & second) and not (test & (first | second))
    with pytest.raises(ValueError, match="weak labels"):
        WeakToStrongDataModule(split="half2")
    torch.save(torch.full((7, 2), 0.5), tmp_path / "wrong.pt")
    with pytest.raises(ValueError, match="shape"):
        WeakToStrongDataModule(split="half2", weak_labels=str(tmp_path / "wrong.pt"), n_docs=40, n_test_docs=20).setup()


def test_pgr_driver_end_to_end(tmp_path):
    """The chain weak -> weak labels -> ceiling -> students runs through the CLI and writes its table."""
    from zoo.weak_to_strong.pgr import run

    small = ["--trainer.max_epochs=-1", "--trainer.max_steps=2", "--trainer.logger=false",
             "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
             "--data.init_args.n_docs=32", "--data.init_args.n_test_docs=16", "--data.init_args.batch_size=8",
             "--model.init_args.network.init_args.backbone=tiny-bert"]
    experiments = Path(__file__).resolve().parents[1] / "experiments"
    results = run(str(experiments / "weak_to_strong_ag_news_weak.yaml"),
                  str(experiments / "weak_to_strong_ag_news_strong.yaml"), [0], ["xent", "logconf"], tmp_path, small)
    row = results["seeds"][0]
    labels = torch.load(tmp_path / "seed0_weak" / "weak_labels.pt")
    assert labels.shape == (16, 2) and torch.allclose(labels.sum(-1), torch.ones(16))
    for key in ("weak", "ceiling", "w2s_xent", "w2s_logconf"):
        assert 0.0 <= row[key] <= 1.0
    assert "pgr_logconf" in (tmp_path / "pgr.md").read_text()
