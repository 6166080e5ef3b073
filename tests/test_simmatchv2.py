"""SimMatchV2 against the official code (the 2-process bank test is in test_simmatchv2_ddp.py).

Reference constants come from RUNNING the official implementation: mingkai-zheng/SimMatchV2 at commit
f0e054c030ded22877f38362653d0f3b0f2aa073, ``models/simmatchv2.py`` ``SimMatchV2.forward`` (distribution
alignment, graph pseudo-labels, loss_ee, loss_ne, bank updates) and ``main.py``'s loss assembly (mask
``prob_ku >= threshold``, loss_nn, loss_sup), on CPU in a 1-process gloo group with ``eman=True`` (which skips
the CUDA-only batch shuffle). Its ``main`` / ``ema`` networks were replaced by lookups returning the
``(logits, embedding)`` rows of the closed-form tables below, with two strong views, ``K=10``, ``topn=4``,
``t=0.1``, ``alpha=0.1``, ``da_m=0.9``, and the banks and ``da`` buffer set to the tables below. The script lives
outside the repository (/tmp/simmatchv2_ref/run_reference.py).
"""
from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers import build
from zoo.core.nets import SmallCNN
from zoo.simmatchv2.graph import (distribution_alignment, edge_edge_loss, finite_or_zero, graph_pseudo_labels,
                                  node_edge_loss, node_node_loss)
from zoo.simmatchv2.module import SimMatchV2

C, D, BX, BU, NL, TOPN, K, V = 4, 6, 3, 5, 7, 4, 10, 2
T, ALPHA, DA_M = 0.1, 0.1, 0.9

# ------------------------------------------------------------------ outputs of the official code
REF_PROBS_DA = [[0.07563630491495132, 0.015622775070369244, 0.0646502897143364, 0.8440905809402466],
                [0.008529103361070156, 0.06350651383399963, 0.596667468547821, 0.3312968909740448],
                [0.1451483517885208, 0.7378597259521484, 0.11407389491796494, 0.002917974255979061],
                [0.9365183115005493, 0.06098860502243042, 0.0013027103850618005, 0.0011904052225872874],
                [0.5716999769210815, 0.00783879030495882, 0.011453501880168915, 0.4090076982975006]]
REF_DA_AFTER = [[0.11454968899488449, 0.19832205772399902, 0.2859113812446594, 0.4012168347835541]]
REF_PSEUDO = [[0.07946141809225082, 0.014347721822559834, 0.06177365779876709, 0.844417154788971],
              [0.07006139308214188, 0.08684660494327545, 0.5404179692268372, 0.30267399549484253],
              [0.13261984288692474, 0.6818320155143738, 0.1829017698764801, 0.0026462881360203028],
              [0.9348080158233643, 0.05869794264435768, 0.0054135387763381, 0.0010804914636537433],
              [0.5208577513694763, 0.08261770009994507, 0.025416124612092972, 0.3711083233356476]]
REF_LOSS_EE, REF_LOSS_NE, REF_LOSS_SUP = 8.89493179321289, 1.4981117248535156, 0.7433764934539795
REF_LOSS_NN = {0.7: 1.6124675273895264, 0.5: 2.6697564125061035}  # threshold -> loss_nn
REF_MASK_07 = [1.0, 0.0, 1.0, 1.0, 0.0]


def table(rows, cols, a, b, scale=1.0):
    i = torch.arange(rows, dtype=torch.float64)[:, None]
    j = torch.arange(cols, dtype=torch.float64)[None]
    return (scale * torch.sin(a * i + b * j + 0.1 * i * j)).float()


def inputs() -> dict:
    """The fixed inputs of the reference run (teacher rows: labeled then weak; student: labeled, view 1, view 2)."""
    return dict(
        teacher_logits=table(BX + BU, C, 1.3, 0.7, 3.0),
        teacher_feat=F.normalize(table(BX + BU, D, 0.9, 1.1), dim=1),
        student_logits=table(BX + BU * V, C, 0.4, 1.9, 2.5),
        student_feat=F.normalize(table(BX + BU * V, D, 1.7, 0.5), dim=1),
        labeled_bank=F.normalize(table(NL, D, 0.6, 1.4), dim=1),
        labeled_labels=torch.tensor([0, 1, 2, 3, 0, 1, 2]),
        unlabeled_bank=F.normalize(table(K, D, 1.1, 0.8), dim=1),
        unlabeled_probs=torch.softmax(table(K, C, 0.5, 1.2, 2.0), dim=1),
        da_mean=torch.tensor([[0.1, 0.2, 0.3, 0.4]]),
        index=torch.tensor([5, 1, 3]),
        targets_x=torch.tensor([1, 0, 3]),
    )


def close(actual, expected, atol=1e-5):
    torch.testing.assert_close(torch.as_tensor(actual).float(), torch.tensor(expected).float(), atol=atol, rtol=1e-5)


# ----------------------------------------------------------------------------- function parity
def test_distribution_alignment_matches_official():
    x = inputs()
    probs = torch.softmax(x["teacher_logits"][BX:], dim=1)
    aligned, new_mean = distribution_alignment(probs, x["da_mean"], DA_M)
    close(aligned, REF_PROBS_DA)
    close(new_mean, REF_DA_AFTER)


def test_graph_pseudo_labels_match_official():
    x = inputs()
    onehot = F.one_hot(x["labeled_labels"], C).float()
    pseudo = graph_pseudo_labels(x["teacher_feat"][BX:], torch.tensor(REF_PROBS_DA), x["labeled_bank"], onehot,
                                 TOPN, T, ALPHA)
    close(pseudo, REF_PSEUDO)
    close(pseudo.sum(1), [1.0] * BU)


def test_consistency_losses_match_official():
    x = inputs()
    views = x["student_feat"][BX:].chunk(V)
    feat_u = x["teacher_feat"][BX:]
    ee = sum(edge_edge_loss(f, feat_u, x["unlabeled_bank"], T) for f in views) / V
    ne = sum(node_edge_loss(f, torch.tensor(REF_PROBS_DA), x["unlabeled_bank"], x["unlabeled_probs"], T)
             for f in views) / V
    close(ee, REF_LOSS_EE)
    close(ne, REF_LOSS_NE)
    for threshold, expected in REF_LOSS_NN.items():
        mask = (torch.tensor(REF_PROBS_DA).max(1).values >= threshold).float()
        loss = node_node_loss(x["student_logits"][BX:], torch.tensor(REF_PSEUDO).repeat(V, 1), mask.repeat(V))
        close(loss, expected)
    assert ((torch.tensor(REF_PROBS_DA).max(1).values >= 0.7).float().tolist()) == REF_MASK_07


def test_empty_unlabeled_probs_give_infinite_node_edge_loss_that_is_dropped():
    x = inputs()
    loss = node_edge_loss(x["student_feat"][BX:BX + BU], torch.tensor(REF_PROBS_DA), x["unlabeled_bank"],
                          torch.zeros(K, C), T)
    assert torch.isinf(loss)
    assert finite_or_zero(loss).item() == 0.0


class Lookup(nn.Module):
    """Stands in for a network: the input holds row ids; returns those rows of fixed (logits, embedding) tables."""

    def __init__(self, logits, feat):
        super().__init__()
        self.register_buffer("logits", logits)
        self.register_buffer("feat", feat)

    def forward(self, ids, embed=False):
        ids = ids.long().flatten()
        return (self.logits[ids], self.feat[ids]) if embed else self.logits[ids]


class LookupEMA(nn.Module):
    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def test_training_step_matches_official_forward_and_loss_assembly():
    """The whole step (DA, mask on aligned probs, losses on the old banks, weights 10/5/5, bank writes)."""
    x = inputs()
    model = SimMatchV2(SmallCNN(num_classes=C, width=4), embedding_dim=D, topn=TOPN, threshold=0.7)
    model.network = Lookup(x["student_logits"], x["student_feat"])
    model.ema = LookupEMA(Lookup(x["teacher_logits"], x["teacher_feat"]))
    model.da_mean.copy_(x["da_mean"])
    for name, value in [("labeled_bank", x["labeled_bank"].clone()),
                        ("labeled_onehot", F.one_hot(x["labeled_labels"], C).float()),
                        ("unlabeled_bank", x["unlabeled_bank"].clone()),
                        ("unlabeled_probs", x["unlabeled_probs"].clone()),
                        ("unlabeled_ptr", torch.zeros(1, dtype=torch.long))]:
        model.register_buffer(name, value)
    model.log_dict = lambda *args, **kwargs: None

    ids = lambda lo, hi: torch.arange(lo, hi, dtype=torch.float32)[:, None]  # noqa: E731
    batch = {"lb": {"idx": x["index"], "label": x["targets_x"], "weak": ids(0, BX)},
             "ulb": {"label": torch.zeros(BU, dtype=torch.long), "weak": ids(BX, BX + BU),
                     "strong": ids(BX, BX + BU), "strong_2": ids(BX + BU, BX + 2 * BU)}}
    loss = model.training_step(batch, 0)

    close(loss, REF_LOSS_SUP + 10 * REF_LOSS_NN[0.7] + 5 * REF_LOSS_EE + 5 * REF_LOSS_NE, atol=1e-4)
    close(model.da_mean, REF_DA_AFTER)
    assert torch.equal(model.labeled_bank[x["index"]], x["teacher_feat"][:BX])
    untouched = [i for i in range(NL) if i not in x["index"].tolist()]
    assert torch.equal(model.labeled_bank[untouched], x["labeled_bank"][untouched])
    assert torch.equal(model.unlabeled_bank[:BU], x["teacher_feat"][BX:])
    assert torch.equal(model.unlabeled_bank[BU:], x["unlabeled_bank"][BU:])
    close(model.unlabeled_probs[:BU], REF_PROBS_DA)
    assert int(model.unlabeled_ptr) == BU


def test_official_ema_decay_rule():
    model = SimMatchV2(SmallCNN(num_classes=C, width=4), ema_decay=0.99)
    model.trainer = type("T", (), {"estimated_stepping_batches": 100})()
    # main.py: ema_m = m if m > 0.996 else 1 - (1 - m) * (cos(pi * curr_step / total) + 1) / 2, curr_step from 1
    assert model.ema_decay_at(0) == pytest.approx(1 - 0.01 * (torch.cos(torch.tensor(torch.pi / 100)).item() + 1) / 2)
    assert model.ema_decay_at(99) == pytest.approx(1.0)
    model.ema_decay = 0.999
    assert model.ema_decay_at(50) == 0.999


def test_banks_fill_during_fit_and_round_trip_through_a_checkpoint(tmp_path):
    """A real 3-step fit: FIFO pointer and labeled rows move as the batches say; the banks live in the checkpoint."""
    cli = build(Path(__file__).resolve().parents[1] / "experiments" / "simmatchv2_digits.yaml", tmp_path)
    model = cli.model

    class Record(L.Callback):
        """The labeled bank as initialised in ``setup``, and the labeled indices of every step."""

        def __init__(self):
            self.initial_bank, self.seen = None, set()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if self.initial_bank is None:
                self.initial_bank = pl_module.labeled_bank.clone()
            self.seen |= set(batch["lb"]["idx"].tolist())

    record = Record()
    cli.trainer.callbacks.append(record)
    cli.trainer.fit(model, datamodule=cli.datamodule)

    per_step = cli.datamodule.batch_size * cli.datamodule.uratio  # smoke: 4 * 7
    assert model.unlabeled_bank.shape[0] == 6 * per_step
    assert int(model.unlabeled_ptr) == 3 * per_step
    assert model.unlabeled_probs[:3 * per_step].sum(1).allclose(torch.ones(3 * per_step))
    assert model.unlabeled_probs[3 * per_step:].abs().sum() == 0
    seen = sorted(record.seen)
    unseen = [i for i in range(len(model.labeled_bank)) if i not in record.seen]
    assert not torch.equal(model.labeled_bank[seen], record.initial_bank[seen])
    assert torch.equal(model.labeled_bank[unseen], record.initial_bank[unseen])

    cli.trainer.save_checkpoint(tmp_path / "simmatchv2.ckpt")
    checkpoint = torch.load(tmp_path / "simmatchv2.ckpt", map_location="cpu", weights_only=False)
    restored = SimMatchV2(SmallCNN(num_classes=10, width=16), topn=16, bank_batches=6)
    restored.on_load_checkpoint(checkpoint)
    restored.load_state_dict(checkpoint["state_dict"])
    for name in ("labeled_bank", "labeled_onehot", "unlabeled_bank", "unlabeled_probs", "unlabeled_ptr", "da_mean"):
        assert torch.equal(getattr(restored, name), getattr(model, name)), name
