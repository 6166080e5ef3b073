"""MDCS (zoo/mdcs): the loss, the long-tailed set and the many/medium/few split against the official code.

Golden numbers: ``fistyee/MDCS`` at commit 1a1d54e55f114c1d922ded64e3a48a4808bddd23, run here on CPU (its
``.cuda()`` calls made no-ops): ``model/loss.py`` ``MDCSLoss(cls_num_list=[50, 20, 8, 4, 2])`` called as its
trainer calls it (``target`` = the labels twice, ``extra_info={"logits": (3, 2B, C), "epoch": epoch}``), and
``data_loader/imbalance_cifar.py`` ``IMBALANCECIFAR10.get_img_num_per_cls`` / ``gen_imbalanced_data``, and the
parameter count of ``model/ldam_drw_resnets/expert_resnet_cifar.py`` ``ResNet_s``.
"""
from __future__ import annotations

from unittest.mock import PropertyMock, patch

import numpy as np
import pytest
import torch

from zoo.mdcs.data import LongTailedDataModule, MDCSStrongView, MDCSWeakView, long_tailed_counts, long_tailed_indices
from zoo.mdcs.module import MDCS, MultiExpertResNet, mdcs_loss, shot_groups

COUNTS = [50, 20, 8, 4, 2]
TAUS = torch.tensor([-0.5, 1.0, 2.5])
# official MDCSLoss total loss, by target vector and epoch (weight 0.6 * min(epoch / 20, 1))
GOLDEN_LOSS = {
    (0, 1, 2, 3, 4, 0): {1: 13.639448165893555, 5: 14.140167236328125, 30: 16.01786231994629},  # 1 confident (expert 2)
    (2, 3, 1, 4, 0, 4): {1: 11.781546592712402, 5: 12.884033203125, 20: 17.018360137939453},  # 3 per expert
    (0, 0, 0, 0, 4, 1): {1: 10.153170585632324, 5: 10.158615112304688, 30: 10.179034233093262},  # 0, 0, 1
}
# get_img_num_per_cls(cls_num, 'exp', imb_factor) with len(data) = 10,000 / 50,000
GOLDEN_COUNTS = {
    (10_000, 10, 100): [1000, 599, 359, 215, 129, 77, 46, 27, 16, 10],
    (10_000, 10, 50): [1000, 647, 419, 271, 175, 113, 73, 47, 30, 20],
    (50_000, 10, 100): [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50],
}
# np.random.seed(0); gen_imbalanced_data on 60 items labelled i % 5, counts [12, 6, 3, 2, 1]
GOLDEN_SUBSET = [30, 55, 20, 50, 10, 40, 5, 35, 45, 15, 0, 25, 26, 11, 16, 21, 46, 1, 32, 7, 52, 13, 23, 9]


def fixed_logits() -> torch.Tensor:
    return torch.randn(3, 12, 5, generator=torch.Generator().manual_seed(0)) * 3  # (experts, 2B, C)


def log_prior(counts=COUNTS) -> torch.Tensor:
    counts = torch.tensor(counts, dtype=torch.float32)
    return (counts / counts.sum()).log()


@pytest.mark.parametrize("target", list(GOLDEN_LOSS))
def test_loss_matches_the_official_mdcs_loss(target):
    labels = torch.tensor(target)
    for epoch, expected in GOLDEN_LOSS[target].items():
        out = mdcs_loss(fixed_logits(), torch.cat([labels, labels]), log_prior(), TAUS, 6, 0.6 * min(epoch / 20, 1))
        assert out["loss"].item() == pytest.approx(expected, rel=1e-6)


def test_logit_adjustment_signs_make_head_and_tail_experts():
    """The adjusted logit is z + tau log pi: with tau > 0 a tail class is penalised in training, so the expert learns
    larger tail logits (tail-favouring at inference); tau < 0 does the reverse (head-favouring)."""
    zero = torch.zeros(3, 1, 5)
    adjusted_ce = [mdcs_loss(zero[e : e + 1], torch.tensor([4]), log_prior(), TAUS[e : e + 1], None, 0)["loss"]
                   for e in range(3)]
    # the rarest class's loss at zero logits: lowest for the head expert, highest for the tail expert
    assert adjusted_ce[0] < adjusted_ce[1] < adjusted_ce[2]


def test_cis_mask_uses_the_true_label_and_the_teacher_gets_no_gradient():
    logits = fixed_logits().requires_grad_()
    labels = torch.tensor([0, 0, 0, 0, 4, 1])
    out = mdcs_loss(logits, torch.cat([labels, labels]), log_prior(), TAUS, 6, 1.0)
    ce_only = mdcs_loss(logits, torch.cat([labels, labels]), log_prior(), TAUS, 6, 0.0)
    (grad_kl,) = torch.autograd.grad(out["loss"] - ce_only["loss"], logits)
    assert grad_kl[:, :6].abs().sum() == 0  # the weak view is the detached teacher
    # only expert 2, row 1 (its teacher predicts label 0 there) is distilled
    assert out["confident_fraction"].item() == pytest.approx(1 / 18)
    rows = grad_kl[:, 6:].abs().sum(-1) > 0
    assert rows.nonzero().tolist() == [[2, 1]]


def test_one_view_without_consistency_is_logit_adjusted_cross_entropy():
    logits, labels = fixed_logits()[1:2, :6], torch.tensor([0, 1, 2, 3, 4, 0])
    out = mdcs_loss(logits, labels, log_prior(), torch.tensor([1.0]), None, 0.0)
    expected = torch.nn.functional.cross_entropy(logits[0] + log_prior(), labels)
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-6) and "kl_loss" not in out


@pytest.mark.parametrize("key", list(GOLDEN_COUNTS))
def test_long_tailed_profile_matches_the_official(key):
    size, classes, ratio = key
    assert long_tailed_counts(size / classes, classes, ratio) == GOLDEN_COUNTS[key]


def test_long_tailed_subset_matches_the_official_selection():
    assert long_tailed_indices(np.arange(60) % 5, [12, 6, 3, 2, 1], seed=0).tolist() == GOLDEN_SUBSET


def test_shot_groups_follow_the_official_thresholds():
    groups = shot_groups(GOLDEN_COUNTS[(10_000, 10, 100)])
    assert groups["many"].nonzero().flatten().tolist() == [0, 1, 2, 3, 4]  # > 100
    assert groups["medium"].nonzero().flatten().tolist() == [5, 6, 7]  # 20..100
    assert groups["few"].nonzero().flatten().tolist() == [8, 9]  # < 20
    assert shot_groups([101, 100, 20, 19])["medium"].tolist() == [False, True, True, False]


def test_data_module_draws_the_long_tailed_set(tmp_path):
    dm = LongTailedDataModule(dataset="cifar10_subset", imbalance_ratio=100, batch_size=4, steps_per_epoch=2,
                              num_workers=0, download=False)
    dm.setup("fit")
    assert dm.class_counts == GOLDEN_COUNTS[(10_000, 10, 100)]
    assert np.bincount(dm.data.y_train[dm.labeled_idx]).tolist() == dm.class_counts
    assert len(dm.data.y_test) == 2000  # the test set stays balanced


def test_views_keep_shape_and_dtype_and_follow_the_rng():
    import random

    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    for view in (MDCSWeakView(), MDCSStrongView()):
        a, b = view(image, random.Random(3)), view(image, random.Random(3))
        assert a.shape == image.shape and a.dtype == np.uint8 and np.array_equal(a, b)
    assert (MDCSStrongView(cutout=32)(image, random.Random(0)) == 0).mean() >= 0.25  # cutout blacks a square


def test_network_shares_the_stem_and_each_expert_has_its_own_stages():
    net = MultiExpertResNet(num_classes=10, num_experts=3, depth=32)
    assert net(torch.zeros(2, 3, 32, 32)).shape == (3, 2, 10)
    experts = sum(p.numel() for p in net.experts.parameters()) + sum(p.numel() for p in net.classifiers.parameters())
    assert len(net.experts) == 3 and experts > 2 * sum(p.numel() for p in net.stem.parameters())
    # official ResNet_s(BasicBlock, [5, 5, 5], num_experts=3, reduce_dimension=True, use_norm=True), without its
    # unused linear_head / linear_few / mlp: 783,856 parameters for 100 classes
    assert sum(p.numel() for p in MultiExpertResNet(num_classes=100).parameters()) == 783_856
    with pytest.raises(ValueError, match="one tau per expert"):
        MDCS(net, taus=(1.0,), class_counts=COUNTS)


def test_consistency_weight_ramps_over_the_first_epochs():
    module = MDCS(MultiExpertResNet(num_classes=5, depth=8, widths=(4, 4, 4)), class_counts=COUNTS)
    weights = []
    for epoch in (0, 9, 19, 30):  # Lightning's 0-based epochs; the official ramp counts from 1
        with patch.object(MDCS, "current_epoch", new_callable=PropertyMock, return_value=epoch):
            weights.append(module.consistency_weight_now())
    assert weights == pytest.approx([0.03, 0.3, 0.6, 0.6])
