"""PL-FMS on hierarchical label expansion (``zoo/hle_plfms``): the stream, pseudo-labels, memory, FMS and A_AUC.

Reference: the official ``Hyun1A/HLE`` (commit 3126cb3), ``single_depth/methods/pl_fms.py`` (FMS filter in
``online_train``, eviction in ``samplewise_importance_memory``), ``single_depth/utils/data_loader.py``
(``MemoryDataset.replace_sample`` / ``update_loss_history``), ``single_depth/main.py`` (``summary``: A_AUC) and the
``data/collections/cifar100_hier_setup2`` stream files. Those functions read files, images and a CUDA model, so they
do not run here: each test recomputes the official rule independently (a plain loop / numpy transcription, or a
hand-computed case) and compares. The released code has no pseudo-labelling routine (its ``pl_fms.py`` keeps only
the memory management and FMS); the PL tests check the rule the paper states and this module implements: the fine
pseudo-label of a coarse-labelled sample is one of its *seen children*, the coarse one of a fine label its parent.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from zoo.hle_plfms.data import chunk_of_step, label_expansion_stream, updates_before_chunk
from zoo.hle_plfms.module import (PLFMS, HierarchicalNet, RehearsalMemory, anytime_auc, fms_keep_probability,
                                  hierarchical_targets)


# ------------------------------------------------------------------------------------------------ the stream
def test_cifar100_stream_has_the_official_task_sizes_and_superclass_grouping():
    """Official cifar100_hier_setup2: task 0 = 8,300 coarse-labelled images (83 per fine class, 415 per
    superclass); tasks 1-5 = 8,340 fine-labelled images each, all children of 4 superclasses per task."""
    fine = np.repeat(np.arange(100), 500)
    parents = np.arange(100) // 5  # 20 superclasses of 5 children (the real map only permutes this)
    s = label_expansion_stream(fine, parents, fine_tasks=5, seed=0)
    assert sorted(s["image"].tolist()) == list(range(50_000))  # every image exactly once
    assert np.bincount(s["task"]).tolist() == [8300] + [8340] * 5
    assert (np.diff(s["task"]) >= 0).all()  # task 0 first, then 1, 2, ...
    first = s["task"] == 0
    assert (s["level"][first] == 0).all() and (s["level"][~first] == 1).all()
    assert (s["label"][first] == parents[fine[s["image"][first]]]).all()
    assert np.bincount(s["label"][first]).tolist() == [415] * 20
    assert (s["label"][~first] == fine[s["image"][~first]]).all()
    assert (s["parent"][~first] == parents[s["label"][~first]]).all() and (s["parent"][first] == -1).all()
    for t in range(1, 6):
        classes = np.unique(s["label"][s["task"] == t])
        assert len(classes) == 20 and len(np.unique(parents[classes])) == 4  # whole superclasses


def test_cifar10_stream_coarse_first_then_pairs_of_fine_classes_and_the_fine_only_switch():
    fine = np.repeat(np.arange(10), 30)
    parents = np.array([1, 1, 0, 0, 0, 0, 0, 0, 1, 1])  # airplane, automobile, ship, truck are vehicles
    s = label_expansion_stream(fine, parents, fine_tasks=5, seed=3, per_class=24)
    assert len(s["image"]) == 240 and len(set(s["image"].tolist())) == 240
    assert (np.bincount(fine[s["image"]]) == 24).all()
    assert np.bincount(s["task"]).tolist() == [40, 40, 40, 40, 40, 40]  # 24 // 6 = 4 coarse per class
    for t in range(1, 6):  # two fine classes per task
        assert len(np.unique(s["label"][s["task"] == t])) == 2
    flat = label_expansion_stream(fine, parents, fine_tasks=5, seed=3, per_class=24, fine_only=True)
    assert (flat["image"] == s["image"]).all() and (flat["level"] == 1).all()
    assert (flat["label"] == fine[flat["image"]]).all()
    with pytest.raises(ValueError, match="fine_tasks"):
        label_expansion_stream(fine, parents, fine_tasks=3, seed=0)


@pytest.mark.parametrize("batch, online_iter", [(8, 3.0), (8, 0.5), (6, 0.375), (4, 0.25)])  # exact in binary
def test_step_to_chunk_matches_the_official_update_accumulation(batch, online_iter):
    """Official ``online_step``: ``num_updates += online_iter`` per sample; a full chunk trains
    ``int(num_updates)`` steps and keeps the remainder. Replayed here as a loop over samples."""
    expected, num_updates = [], 0.0
    for chunk in range(40):
        for _ in range(batch):
            num_updates += online_iter
        expected += [chunk] * int(num_updates)
        num_updates -= int(num_updates)
    ours = [chunk_of_step(s, batch, online_iter) for s in range(len(expected))]
    assert ours == expected
    assert updates_before_chunk(40, batch, online_iter) == len(expected)


# --------------------------------------------------------------------------------------- pseudo-labels
def test_pseudo_labels_pick_only_seen_children_of_the_coarse_label_and_the_parent_of_a_fine_label():
    parent = torch.tensor([0, 0, 1, 1, 0, -1])  # fine 0, 1, 4 are children of coarse 0; 2, 3 of 1; 5 unseen
    fine_seen = torch.tensor([True, True, True, True, False, False])
    labels = torch.tensor([0, 0, 1, 3, 0, 0])
    levels = torch.tensor([0, 0, 0, 1, 0, 0])
    logits = torch.full((6, 6), -5.0)
    logits[0, 1], logits[0, 2] = 4.0, 6.0  # coarse 0: fine 2 (not a child) scores highest -> child 1, unconfident
    logits[1, 0], logits[1, 1] = 1.0, 1.0  # coarse 0, undecided between its children: below the threshold
    logits[2, 3], logits[2, 4] = 9.0, 20.0  # coarse 1: fine 4 is unseen (and not a child) -> child 3, confident
    logits[4, 4] = 20.0  # coarse 0: its only strong child (4) is unseen -> no pseudo-label
    logits[5, 0] = 8.0  # coarse 0: confident child 0
    ct, cw, ft, fw = hierarchical_targets(labels, levels, parent, fine_seen, logits, threshold=0.5, weight=0.7,
                                          pseudo=True)
    assert ct.tolist() == [0, 0, 1, 1, 0, 0] and cw.tolist() == pytest.approx([1, 1, 1, 0.7, 1, 1])
    assert ft[0] == 1 and ft[2] == 3 and ft[3] == 3 and ft[5] == 0
    assert fw.tolist() == pytest.approx([0.0, 0.0, 0.7, 1.0, 0.0, 0.7])
    _, cw, _, fw = hierarchical_targets(labels, levels, parent, fine_seen, logits, 0.5, 0.7, pseudo=False)
    assert cw.tolist() == [1, 1, 1, 0, 1, 1] and fw.tolist() == [0, 0, 0, 1, 0, 0]


# ---------------------------------------------------------------------------------------------- memory
def _memory(entries, scores, num_coarse=2):
    """A memory holding (label, level) entries inserted in order, with the given importance scores."""
    mem = RehearsalMemory(len(entries), (1, 1, 1), num_coarse)
    for slot, (label, level) in enumerate(entries):
        mem.write(slot, torch.zeros(1, 1, 1, dtype=torch.uint8), label, level, position=slot)
    mem.score[:] = torch.tensor(scores, dtype=torch.float64)
    return mem


def test_eviction_takes_the_least_important_sample_of_the_largest_class():
    """Hand-computed (official ``samplewise_importance_memory``): classes are coarse 0 (id 0), coarse 1 (id 1),
    fine 0 (id 2) ... Memory: coarse 0 x3 (scores .5, -.2, .1), coarse 1 x2, fine 0 x1. An incoming fine-0
    sample: counts become 3, 2, 2 -> coarse 0 loses its lowest score, slot 1."""
    first_seen = torch.tensor([1, 2, 7, -1, -1])
    mem = _memory([(0, 0), (0, 0), (1, 0), (0, 0), (1, 0), (0, 1)], [0.5, -0.2, 0.3, 0.1, -0.9, 0.0])
    assert mem.eviction_slot(new_class=2, first_seen=first_seen) == 1
    # with an incoming coarse-1 sample counts are 3, 3, 1: a tie, the earlier-seen class (coarse 0) loses
    assert mem.eviction_slot(new_class=1, first_seen=first_seen) == 1
    first_seen[1] = 0  # now coarse 1 was seen first: it loses its lowest, slot 4
    assert mem.eviction_slot(new_class=1, first_seen=first_seen) == 4
    mem.score[[0, 1, 3]] = 0.0  # equal scores: the earliest inserted goes (the official per-class list order)
    first_seen[1] = 2
    assert mem.eviction_slot(new_class=2, first_seen=first_seen) == 0


def test_a_new_sample_starts_at_the_mean_importance_of_its_class():
    """Official ``replace_sample``: the mean score of the class's other samples; the first of its class starts at 0
    when appended and at the mean of all scores when it replaces another."""
    mem = _memory([(0, 0), (0, 0), (1, 0)], [0.2, 0.6, -1.0])
    image = torch.zeros(1, 1, 1, dtype=torch.uint8)
    mem.write(2, image, 0, 0, position=9)  # replaces the coarse-1 sample with a third coarse-0 one
    assert float(mem.score[2]) == pytest.approx(0.4)
    mem.write(0, image, 3, 1, position=10)  # the first fine-3 sample, replacing: mean of all (0.2, .6, .4)
    assert float(mem.score[0]) == pytest.approx((0.2 + 0.6 + 0.4) / 3)
    fresh = RehearsalMemory(3, (1, 1, 1), 2)
    fresh.write(0, image, 1, 0, position=0)
    assert float(fresh.score[0]) == 0.0 and len(fresh) == 1


def test_importance_credit_matches_the_official_loss_history_update():
    """Official ``update_loss_history`` in numpy: loss_diff = mean(loss - prev) over slots not replaced;
    difference = loss_diff - mean(score[previous_idx]) / len(previous_idx); score[previous_idx] -= 0.1 * difference
    (numpy's fancy-index update applies once per index, repeats included in the mean)."""
    mem = _memory([(0, 0)] * 5, [0.1, -0.3, 0.0, 0.4, 0.2])
    mem.prev_loss[:] = torch.tensor([1.0, 2.0, 0.5, 1.5, 3.0], dtype=torch.float64)
    mem.loss_valid[:] = torch.tensor([True, True, False, True, True])  # slot 2 was replaced since
    previous_idx = np.array([1, 3, 1, 4])
    for i in previous_idx:
        mem.draws[i] += 1
    loss = np.array([0.8, 1.5, 2.0, 1.4, 2.9])
    prev, score = mem.prev_loss.numpy().copy(), mem.score.numpy().copy()
    mask = np.array([True, True, False, True, True])
    difference = np.mean((loss - prev)[mask]) - np.mean(score[previous_idx]) / len(previous_idx)
    score[previous_idx] -= (1 - 0.9) * difference
    mem.credit(torch.tensor(loss, dtype=torch.float64), ema=0.9)
    assert mem.score.numpy() == pytest.approx(score, abs=1e-12)
    assert mem.prev_loss.numpy() == pytest.approx(loss) and mem.loss_valid.all() and (mem.draws == 0).all()


# ------------------------------------------------------------------------------------------------ FMS
class _Flat(nn.Module):
    num_features = 4

    def __init__(self):
        super().__init__()
        self.layer = nn.Sequential(nn.Flatten(), nn.Linear(3, 4))

    def forward(self, x):
        return self.layer(x)


def _module(**kwargs) -> PLFMS:
    module = PLFMS(HierarchicalNet(_Flat(), num_coarse=2, num_fine=4), image_shape=(3, 1, 1), **kwargs)
    module.stream_length = 400
    module.register_buffer("mean", torch.zeros(1, 3, 1, 1), persistent=False)
    module.register_buffer("std", torch.ones(1, 3, 1, 1), persistent=False)
    return module


def test_fms_keep_probability_is_the_official_ramp():
    """``min(1, (n_seen - n_first) / (N / K))``."""
    p = fms_keep_probability(torch.tensor([100, 150, 190, 200]), seen=200, stream_length=400, classes_seen=4)
    assert p.tolist() == pytest.approx([1.0, 0.5, 0.1, 0.0])


def test_fms_holds_back_new_class_stream_samples_and_memory_fills_the_batch():
    """Sampling statistics of the batch composition: stream samples of a class first seen 50 samples ago (N/K = 100)
    are kept with probability 0.5, of an old class always; memory samples fill the batch up to 16 every time."""
    module = _module(memory_size=40, batch_size=16)
    g = torch.Generator().manual_seed(0)
    for position in range(200):  # coarse 0 from the start, fine 1 from position 150 on
        label, level = (0, 0) if position < 150 else (1, 1)
        module.observe(torch.zeros(3, 1, 1, dtype=torch.uint8), label, level, 0, position, g)
    assert int(module.first_seen[0]) == 1 and int(module.first_seen[2 + 1]) == 151
    chunk = {"idx": torch.arange(192, 200), "image": torch.zeros(8, 3, 1, 1, dtype=torch.uint8),
             "label": torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]), "level": torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])}
    kept = []
    for _ in range(2000):
        images, labels, levels, keep = module.compose_batch(chunk, g)
        assert len(images) == 16 and (labels[: int(keep.sum())] == chunk["label"][keep]).all()
        kept.append(keep.double())
    rate = torch.stack(kept).mean(0)  # K = 2 classes seen -> N/K = 200: p = (200 - 1) / 200 and (200 - 151) / 200
    assert rate[:4].tolist() == pytest.approx([199 / 200] * 4, abs=0.01)
    assert rate[4:].tolist() == pytest.approx([49 / 200] * 4, abs=0.03)
    er = _module(memory_size=40, batch_size=16, flexible_sampling=False)
    er.load_state_dict(module.state_dict())
    images, _, _, keep = er.compose_batch(chunk, g)
    assert keep.all() and len(images) == 16  # ER: every new sample, 8 memory samples


def test_memory_budget_and_reservoir_rule():
    module = _module(memory_size=10, memory_update="reservoir")
    g, replay = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    expected = list(range(10))
    for position in range(60):
        module.observe(torch.zeros(3, 1, 1, dtype=torch.uint8), position % 2, 0, -1, position, g)
        if position >= 10:  # official reservoir_memory: j = randint(0, seen), replace slot j when j < size
            j = int(torch.randint(0, position + 1, (), generator=replay))
            if j < 10:
                expected[j] = position
        assert len(module.memory) == min(position + 1, 10)
    assert module.memory.inserted_at.tolist() == expected


# --------------------------------------------------------------------------------------------- A_AUC
def test_aauc_is_the_area_under_the_anytime_accuracy_curve():
    """i-Blurry / HLE: A_AUC = sum_i f(i dn) dn over evaluations every dn samples, normalised by the span k dn
    (official ``np.mean(eval_results['test_acc'])``); fine accuracy is 0 before any fine class was seen."""
    curve, dn = [0.0, 0.0, 0.31, 0.52, 0.48, 0.66], 1000
    area = sum(f * dn for f in curve) / (len(curve) * dn)
    assert anytime_auc(curve) == pytest.approx(area) == pytest.approx(1.97 / 6)


def test_evaluation_counts_only_seen_classes_and_accepts_a_coarse_answer_from_either_head():
    module = _module()
    module.first_seen[0] = 1  # coarse 0 seen; fine 0 and 1 seen, children of coarse 0 and 1
    module.first_seen[2 + 0], module.first_seen[2 + 1] = 5, 6
    module.parent[0], module.parent[1] = 0, 1
    with torch.no_grad():
        for p in module.network.parameters():
            p.zero_()
        module.network.coarse_head.bias.copy_(torch.tensor([0.0, 5.0]))  # predicts coarse 1 (unseen): masked -> 0
        module.network.fine_head.bias.copy_(torch.tensor([0.0, 3.0, 9.0, 9.0]))  # predicts fine 1 (2, 3 unseen)
    batch = {"image": torch.zeros(4, 3, 1, 1, dtype=torch.uint8), "coarse": torch.tensor([0, 1, 1, 0]),
             "fine": torch.tensor([0, 1, 3, 2])}
    module.validation_step(batch, 0)
    counts = {k: float(m.compute()) for k, m in module.counts.items()}
    # coarse known: 0 (seen) and 1 (parent of seen fine 1): all 4 images count. Coarse head says 0 (1 is masked):
    # right for images 0, 3. Through the fine head (fine 1 -> coarse 1): right for images 1, 2.
    assert counts == {"coarse": 4.0, "coarse_head": 2.0, "coarse_n": 4.0, "fine": 1.0, "fine_n": 2.0}
