"""ShrinkMatch's loss pieces against the official code, its DA gather under 2-process gloo, and its wiring.

Golden numbers: LiheYoung/ShrinkMatch @ c4339b8109fcfe64b188edfca5180d2743c4bd0f (CIFAR code), produced by
running, on the inputs of ``official_inputs`` below (one call per step, in order):
- ``ShrinkMatch.distribution_alignment`` (CIFAR/network/shrinkmatch.py; 32-entry queue, 1-process gloo group)
  on ``softmax(logits_u_w)`` (CIFAR10_DA only; CIFAR100_NO_DA uses the plain softmax, i.e. without ``--DA``);
- the per-iteration statements of ``train()`` in CIFAR/shrinkmatch.py, from ``loss_x = F.cross_entropy(...)``
  to ``loss = loss_x + loss_u + (loss_u_shrink / B) * certain_ratio_ema``, exec'd from the file's source with
  ``certain_ratio_ema = None`` before the first step as ``train()`` sets it, threshold 0.95
  (-> mask, loss_x, loss_u, shrink_sum = loss_u_shrink, removed = removed_class_idx_cur, certain_ratio_ema, loss);
- ``shrink_loss`` (CIFAR/shrinkmatch.py) on each row alone (-> per_sample), and again with all-zero aux logits
  (-> weight_times_log_kept = max p * 1[reached] * log(number of kept classes)).
``.cuda()`` was made a no-op to run on CPU. ``max_prob`` is the max of the official DA'd probabilities.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import build
from lightning.pytorch import Callback

from zoo.core.datasets import load_image_set
from zoo.core.nets import SmallCNN
from zoo.shrinkmatch.module import (ShrinkMatch, certain_loss, distribution_alignment, shrink_loss, shrunk_class_space,
                                    updated_certain_ratio)

THRESHOLD = 0.95


def official_inputs(seed: int, steps: int, num_lb: int, num_ulb: int, num_classes: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    scale = torch.linspace(0.5, 7.0, num_ulb)[:, None]  # from near-uniform to confident weak predictions
    return [dict(logits_x=torch.randn(num_lb, num_classes, generator=g),
                 labels_x=torch.randint(0, num_classes, (num_lb,), generator=g),
                 logits_weak=torch.randn(num_ulb, num_classes, generator=g) * scale,
                 logits_strong=torch.randn(num_ulb, num_classes, generator=g) * 2,
                 logits_aux=torch.randn(num_ulb, num_classes, generator=g) * 2) for _ in range(steps)]


CIFAR10_DA = [
    dict(max_prob=[0.220895246, 0.261375338, 0.322508603, 0.302924216, 0.654856026, 0.885011375, 0.554544449, 0.978066742],
         mask=[0, 0, 0, 0, 0, 0, 0, 1],
         removed=[9, 9, 7, 6, 3, 2, 3],
         per_sample=[0.0, 0.188873619, 0.823113561, 1.23209691, 2.57689023, 0.153640687, 0.988461554, 0.0],
         weight_times_log_kept=[0.0, 0.181171581, 0.447091848, 0.487537712, 1.36173487, 1.94456875, 1.15314281, 0.0],
         loss_x=2.85479116, loss_u=0.629339576, shrink_sum=5.96307659, certain_ratio_ema=0.125, loss=3.57730389,
         da_queue_mean=[0.000955811935, 0.00285129785, 0.00160176656, 0.00296403351, 0.00598156033, 0.00392669439,
                        0.00442229444, 0.00617241673, 0.0017527279, 0.000621396699]),
    dict(max_prob=[0.318480939, 0.35058856, 0.747004211, 0.386364311, 0.760272145, 0.564952493, 0.994996309, 0.999979436],
         mask=[0, 0, 0, 0, 0, 0, 1, 1],
         removed=[9, 8, 4, 6, 3, 4],
         per_sample=[0.38376075, 1.94640505, 4.51259375, 2.07298589, 3.2619977, 3.21072578, 0.0, 0.0],
         weight_times_log_kept=[0.220754161, 0.385160893, 1.45360303, 0.621829391, 1.58094144, 1.09934676, 0.0, 0.0],
         loss_x=2.91705799, loss_u=0.592049003, shrink_sum=15.3884697, certain_ratio_ema=0.125125, loss=3.74979234,
         da_queue_mean=[0.00155262009, 0.00439455453, 0.00216159248, 0.00714098103, 0.0070540295, 0.00783030037,
                        0.0102645103, 0.0141000515, 0.00335064973, 0.00465071108]),
    dict(max_prob=[0.193877921, 0.942222357, 0.282990247, 0.683106422, 0.492106676, 0.513157129, 0.51475805, 0.749436736],
         mask=[0, 0, 0, 0, 0, 0, 0, 0],
         removed=[9, 2, 7, 3, 4, 3, 2, 2],
         per_sample=[0.0, 3.42225862, 0.680372655, 1.87727642, 1.82039523, 0.954635441, 1.59771597, 1.3866744],
         weight_times_log_kept=[0.0, 2.07027411, 0.392307788, 1.42047989, 0.957595348, 1.06708026, 1.13103902, 1.64668083],
         loss_x=2.12813902, loss_u=0.0, shrink_sum=11.7393284, certain_ratio_ema=0.12499987499999998, loss=2.31156588,
         da_queue_mean=[0.00338972686, 0.00617386401, 0.0106296707, 0.00784793124, 0.0122975446, 0.00915258378,
                        0.0108492514, 0.0146587845, 0.00944895763, 0.00930168666]),
]
CIFAR100_NO_DA = [
    dict(max_prob=[0.0246233977, 0.161439419, 0.289234817, 0.384005994, 0.607785642, 0.854481936],
         mask=[0, 0, 0, 0, 0, 0],
         removed=[99, 72, 40, 17, 6, 4],
         per_sample=[0.0, 0.552062392, 0.378866196, 4.37577772, 3.97810173, 4.55367661],
         weight_times_log_kept=[0.0, 0.543614268, 1.18900776, 1.70146012, 2.76778102, 3.90900779],
         loss_x=5.03434801, loss_u=0.0, shrink_sum=13.8384848, certain_ratio_ema=0.0, loss=5.03434801),
]
CASES = {"cifar10_da": (CIFAR10_DA, dict(seed=7, num_lb=4, num_ulb=8, num_classes=10), True),
         "cifar100_no_da": (CIFAR100_NO_DA, dict(seed=11, num_lb=4, num_ulb=6, num_classes=100), False)}


def close(actual, expected, atol=1e-6):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float64),
                               torch.as_tensor(expected, dtype=torch.float64), rtol=1e-5, atol=atol)


def test_inputs_are_the_ones_the_constants_were_made_from():
    first = official_inputs(7, 1, 4, 8, 10)[0]["logits_weak"][0, :3]  # a changed torch RNG would invalidate them
    close(first, [-0.26603943, 0.14957093, -0.71022224], atol=1e-7)


@pytest.mark.parametrize("case", CASES)
def test_losses_match_official_step_by_step(case):
    reference, sizes, use_da = CASES[case]
    num_classes = sizes["num_classes"]
    queue, pointer = torch.zeros(32, num_classes), torch.zeros((), dtype=torch.long)
    ratio_ema = torch.zeros(())
    steps = official_inputs(sizes["seed"], len(reference), sizes["num_lb"], sizes["num_ulb"], num_classes)
    for step, (x, ref) in enumerate(zip(steps, reference)):
        probs = torch.softmax(x["logits_weak"], dim=1)
        if use_da:
            probs = distribution_alignment(probs, queue, pointer)
            close(queue.mean(0), ref["da_queue_mean"], atol=1e-9)
        close(probs.max(1).values, ref["max_prob"])

        loss_u, mask = certain_loss(x["logits_strong"], probs, THRESHOLD)
        assert mask.tolist() == ref["mask"]
        close(loss_u, ref["loss_u"])

        # the shrunk-class search: the start rank of the kept tail, for the uncertain samples
        per_sample, start, sub_conf, uncertain = shrink_loss(probs, x["logits_aux"], THRESHOLD)
        assert uncertain.tolist() == [not m for m in ref["mask"]]
        assert start[uncertain].tolist() == ref["removed"]
        # principle 1 weight (max p * 1[reached]) times log(#kept), as the official code gives it for zero logits
        weighted_log_kept, *_ = shrink_loss(probs, torch.zeros_like(x["logits_aux"]), THRESHOLD)
        close(weighted_log_kept, ref["weight_times_log_kept"])
        close(per_sample, ref["per_sample"], atol=2e-6)
        close(per_sample.sum(), ref["shrink_sum"], atol=1e-5)

        ratio_ema = updated_certain_ratio(ratio_ema, mask.mean(), 0.999, restart=step == 0)  # principle 2
        close(ratio_ema, ref["certain_ratio_ema"])
        loss = F.cross_entropy(x["logits_x"], x["labels_x"]) + loss_u + ratio_ema * per_sample.mean()
        close(loss, ref["loss"])


def test_subspace_confidence_is_the_renormalised_top1_at_the_official_start():
    reference, sizes, _ = CASES["cifar100_no_da"]
    x = official_inputs(sizes["seed"], 1, sizes["num_lb"], sizes["num_ulb"], sizes["num_classes"])[0]
    probs = torch.softmax(x["logits_weak"], dim=1)
    _, start, sub_conf, reached = shrunk_class_space(probs, THRESHOLD)
    p = np.sort(probs.double().numpy(), axis=1)[:, ::-1]
    for row, c in enumerate(reference[0]["removed"]):  # every row is uncertain in this case
        expected = p[row, 0] / (p[row, 0] + p[row, c:].sum())
        close(sub_conf[row], expected)
        assert bool(reached[row]) == (expected >= THRESHOLD)
        if c > 2:  # the start is the *first* rank that reaches the threshold
            assert p[row, 0] / (p[row, 0] + p[row, c - 1:].sum()) < THRESHOLD


# ---------------------------------------------------------------- the module's wiring
def digits_batch(num_lb: int = 4, num_ulb: int = 16) -> dict:
    data = load_image_set("digits", download=False)
    mean, std = torch.tensor(data.mean).view(1, -1, 1, 1), torch.tensor(data.std).view(1, -1, 1, 1)
    images = (torch.from_numpy(data.x_train[: num_lb + num_ulb]).permute(0, 3, 1, 2).float() / 255 - mean) / std
    labels = torch.from_numpy(data.y_train[: num_lb + num_ulb])
    unlabeled = {"weak": images[num_lb:], "strong": images[num_lb:].flip(3), "label": labels[num_lb:]}
    return {"lb": {"weak": images[:num_lb], "label": labels[:num_lb]}, "ulb": unlabeled}


def test_shrink_loss_trains_aux_head_and_backbone_but_not_the_main_head():
    torch.manual_seed(0)
    model = ShrinkMatch(SmallCNN(num_classes=10, width=8), threshold=0.5)
    with torch.no_grad():  # a peaked classifier, so the batch holds certain samples and shrinkable uncertain ones
        model.network.classifier.weight.mul_(30)
    batch = digits_batch()
    loss = model.training_step(batch, 0)
    loss.backward()
    assert 0 < float(model.certain_ratio_ema) < 1
    for name, p in model.aux_head.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name

    # the shrink term alone, on the same batch: it reaches the backbone through the aux head, never the main head
    lb, ulb = batch["lb"], batch["ulb"]
    features = model.network.features(torch.cat([lb["weak"], ulb["weak"], ulb["strong"]]))
    weak_logits = model.network.classifier(features[4:20]).detach()
    probs = distribution_alignment(torch.softmax(weak_logits, 1), torch.zeros(32, 10), torch.zeros((), dtype=torch.long))
    per_sample, *_ = shrink_loss(probs, model.aux_head(features[20:]), 0.5)
    assert per_sample.sum() > 0
    backbone, head = model.network.body[0].weight, model.network.classifier.weight
    grad_backbone, grad_head = torch.autograd.grad(per_sample.mean(), [backbone, head], allow_unused=True)
    assert grad_backbone.abs().sum() > 0 and grad_head is None


@pytest.mark.parametrize("reset", [True, False])
def test_certain_ratio_ema_restarts_each_epoch_only_when_asked(reset, tmp_path):
    class Record(Callback):
        def __init__(self):
            self.ratios, self.emas = [], []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.ratios.append(float(trainer.callback_metrics["train/mask_ratio"]))
            self.emas.append(float(pl_module.certain_ratio_ema))

    config = os.path.join(os.path.dirname(__file__), "..", "experiments", "shrinkmatch_digits.yaml")
    cli = build(config, tmp_path, "--trainer.max_steps=4", "--trainer.limit_val_batches=0",
                "--data.init_args.steps_per_epoch=2", "--model.init_args.threshold=0.12",
                "--model.init_args.certain_ratio_decay=0.5",
                f"--model.init_args.reset_certain_ratio_each_epoch={str(reset).lower()}")
    record = Record()
    cli.trainer.callbacks.append(record)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    r, ema = record.ratios, record.emas
    expected = [r[0]]
    for step in (1, 2, 3):
        restart = reset and step == 2
        expected.append(r[step] if restart else 0.5 * expected[-1] + 0.5 * r[step])
    assert any(r), "the test needs certain samples"
    close(ema, expected)
