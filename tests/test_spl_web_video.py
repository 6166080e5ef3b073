"""SPL (zoo/spl_web_video): the sub-pseudo-label rule, its label space and pruning, the weak-label noise model and
the three-stage schedule.

There is no official code (Google, none released): the rule is tested against the paper's text (arXiv 2101.03713,
Sec. 3): a clip with query label w and teacher prediction t keeps w when t == w, and otherwise gets the class of
the pair (w, t) in an extrapolated space of N + N (N - 1) classes; pruning keeps the most frequent pairs.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from zoo.core.nets import SmallCNN
from zoo.spl_web_video.data import weak_labels
from zoo.spl_web_video.module import SPL, build_label_space, class_pairs, pair_counts, sub_pseudo_labels

N = 3
WEAK = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 0])
TEACHER = torch.tensor([0, 1, 1, 1, 2, 2, 0, 0, 0, 2])


def test_pair_counts_are_the_joint_histogram():
    counts = pair_counts(WEAK, TEACHER, N)
    expected = torch.zeros(N, N, dtype=torch.long)
    for w, t in zip(WEAK.tolist(), TEACHER.tolist()):
        expected[w, t] += 1
    assert torch.equal(counts, expected)


def test_full_space_is_n_squared_and_agreement_keeps_the_query():
    counts = torch.ones(N, N, dtype=torch.long)            # every pair seen once
    table = build_label_space(counts, None)
    assert torch.equal(table.diagonal(), torch.arange(N))  # t == w -> class w
    off = table[~torch.eye(N, dtype=torch.bool)]
    assert sorted(off.tolist()) == list(range(N, N * N))   # N (N - 1) new classes, each pair its own
    assert torch.equal(sub_pseudo_labels(torch.tensor([1, 2]), torch.tensor([1, 0]), table),
                       torch.stack([torch.tensor(1), table[2, 0]]))


def test_pruning_keeps_the_most_frequent_pairs_and_sends_the_rest_to_the_query():
    counts = pair_counts(WEAK, TEACHER, N)   # off-diagonal: (2,0):3, (0,1):2, (1,2):1, (0,2):1, others 0
    table = build_label_space(counts, 2)
    assert table[2, 0] == N and table[0, 1] == N + 1      # by decreasing frequency
    assert table[1, 2] == 1 and table[0, 2] == 0           # pruned: back to the query w
    assert table[1, 0] == 1                                # never seen: pruned too
    assert torch.equal(sub_pseudo_labels(WEAK, TEACHER, table), torch.tensor([0, 4, 4, 1, 1, 2, 3, 3, 3, 0]))
    # ties are broken in row-major order, and unseen pairs never become classes
    unpruned = build_label_space(counts, None)
    assert (unpruned >= N).sum() == 4
    assert unpruned[0, 2] == N + 2 and unpruned[1, 2] == N + 3


def test_class_pairs_map_every_spl_class_back_to_its_pair():
    table = build_label_space(pair_counts(WEAK, TEACHER, N), None)
    pairs = class_pairs(table, N + N * (N - 1))
    for w in range(N):
        for t in range(N):
            k = table[w, t]
            if k >= N:
                assert pairs[k].tolist() == [w, t]
    assert pairs[:N].tolist() == [[c, c] for c in range(N)]
    assert (pairs[N + 4:] == -1).all()                     # unused slots of the full space


def test_weak_label_noise_model():
    true = np.repeat(np.arange(10), 2000)
    related = ((3, 5), (1, 9))
    weak = weak_labels(true, 10, related, absent_rate=0.3, related_rate=0.15, seed=0)
    cat_to_dog = np.mean(weak[true == 3] == 5)
    assert abs(cat_to_dog - 0.15 - 0.3 / 9) < 0.02          # related swap + the uniform share of absent noise
    assert abs(np.mean(weak[true == 0] != 0) - 0.3) < 0.02  # no related class: absent noise only
    assert abs(np.mean(weak[true == 3] != 3) - 0.45) < 0.02
    assert np.array_equal(weak, weak_labels(true, 10, related, 0.3, 0.15, seed=0))   # fixed by its seed


def _module(rule: str, sub_concepts=None) -> SPL:
    module = SPL(SmallCNN(num_classes=N, width=4), num_classes=N, label_rule=rule, num_sub_concepts=sub_concepts)
    module._trainer = SimpleNamespace(max_steps=9)
    return module


def test_label_space_sizes_and_targets_per_rule():
    assert _module("spl").pretrain_head.out_features == N * N
    assert _module("spl", 2).pretrain_head.out_features == N + 2
    assert _module("pseudo").pretrain_head.out_features == N
    clips = torch.randn(len(WEAK), 3, 32, 32)
    for rule in ("spl", "pseudo", "weak"):
        module = _module(rule)
        module.pair_to_class.copy_(build_label_space(pair_counts(WEAK, TEACHER, N), None))
        teacher = module.teacher_predictions(clips)
        expected = {"weak": WEAK, "pseudo": teacher,
                    "spl": module.pair_to_class[WEAK, teacher]}[rule]
        assert torch.equal(module.pretrain_targets(WEAK, clips), expected)


def test_teacher_gets_no_gradient_after_its_stage_and_keeps_its_mode():
    module = _module("spl")
    assert [module.stage(s) for s in range(9)] == ["teacher"] * 3 + ["pretrain"] * 3 + ["finetune"] * 3
    module.train()
    clips = torch.randn(4, 3, 32, 32)
    targets = module.pretrain_targets(torch.tensor([0, 1, 2, 0]), clips)
    assert not targets.requires_grad and module.teacher_network.training
    bn = next(m for m in module.teacher_network.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = bn.running_mean.clone()
    module.teacher_predictions(clips)
    assert torch.equal(bn.running_mean, before)             # labelled in eval mode: BN statistics untouched


def test_each_stage_trains_only_its_modules():
    module = _module("spl")
    for stage, trained in (("teacher", {"teacher_network"}), ("pretrain", {"network", "pretrain_head"}),
                           ("finetune", {"network"})):
        module.train_only(stage)
        grads = {name for name, p in module.named_parameters() if p.requires_grad}
        assert {name.split(".")[0] for name in grads} == trained
        assert any(n.startswith("network.classifier") for n in grads) == (stage == "finetune")
