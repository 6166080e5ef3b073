"""Trickle-down (Contrast Instructions): Bradley-Terry loss, consistency metric, RewardFusion, ConvexDA, evaluation plan.

The official scripts (shadowkiller33/Contrast-Instruction @ 20f71939d4ac1e866062b1090b5a94bdbd07ccfc) need LLaMA-7B,
SimCSE and nlpaug from the hub, so the constants here are computed independently from the paper's formulas (numpy /
plain Python, written out in each test), not by the zoo's code.
"""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from zoo.lm.embeddings import CosineIndex
from zoo.lm.heads import bradley_terry_loss
from zoo.reward_consistency.augment import convex_hull_selection, spelling_noise
from zoo.reward_consistency.module import consistency, fuse_rewards

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def test_bradley_terry_matches_formula():
    chosen, rejected = np.array([1.5, -0.2, 0.3, 4.0]), np.array([0.5, 0.1, 0.3, -30.0])
    expected = np.mean(np.log1p(np.exp(-(chosen - rejected))))  # -log sigmoid(d) = log(1 + e^-d)
    got = bradley_terry_loss(torch.tensor(chosen), torch.tensor(rejected)).item()
    assert got == pytest.approx(expected, rel=1e-6)
    assert math.isfinite(bradley_terry_loss(torch.tensor([-200.0]), torch.tensor([200.0])).item())


def test_consistency_is_strict_and_skips_unscored():
    scores = torch.tensor([1.0, 0.5, 1.0, 2.0, math.nan])
    pairs = torch.tensor([[0, 1], [0, 2], [3, 0], [1, 3], [0, 4]])
    value, count = consistency(scores, pairs)
    assert count == 4 and value == pytest.approx(2 / 4)  # ties are inconsistent; the NaN row is not counted


def test_fuse_rewards_matches_similarity_weighted_mean():
    rewards = torch.tensor([0.3, -1.0, 2.0, 0.7])
    # quantity 0 = text 0 itself + neighbours 2 (sim 0.95) and 3 (sim 0.91); quantity 1 = text 1 alone
    sims = {0: [(0, 1.0), (2, 0.95), (3, 0.91)], 1: [(1, 1.0)]}
    expected = [sum(s * rewards[t].item() for t, s in members) / sum(s for _, s in members) for members in sims.values()]
    rows = torch.tensor([0, 0, 0, 1])
    texts = torch.tensor([0, 2, 3, 1])
    raw = torch.tensor([1.0, 0.95, 0.91, 1.0])
    weights = raw / torch.tensor([2.86, 2.86, 2.86, 1.0])
    torch.testing.assert_close(fuse_rewards(rewards, rows, texts, weights, 2), torch.tensor(expected))


def test_cosine_index_threshold_then_top_k():
    corpus = np.eye(4, dtype=np.float32)
    query = np.array([[0.96, 0.28, 0.0, 0.0], [0.0, 0.0, 0.6, 0.8]], dtype=np.float32)
    result = CosineIndex(corpus).search(query, top_k=1, threshold=0.9)
    assert result[0] == [(0, pytest.approx(0.96))] and result[1] == []  # 0.8 < 0.9 finds nothing
    assert [i for i, _ in CosineIndex(corpus).search(query, top_k=3)[1]] == [3, 2, 0]


def _monotone_chain(points: np.ndarray) -> set[int]:
    """Andrew's monotone chain convex hull (strict turns), an implementation independent of scipy/Qhull."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    cross = lambda o, a, b: ((points[a][0] - points[o][0]) * (points[b][1] - points[o][1])
                             - (points[a][1] - points[o][1]) * (points[b][0] - points[o][0]))
    hull = []
    for sweep in (order, order[::-1]):
        part = []
        for i in sweep:
            while len(part) >= 2 and cross(part[-2], part[-1], i) <= 0:
                part.pop()
            part.append(i)
        hull += part[:-1]
    return set(hull)


def test_convex_hull_selection_matches_pca_and_hull_by_hand():
    rng = np.random.default_rng(3)
    for _ in range(5):
        embeddings = rng.normal(size=(5, 16))
        centred = embeddings - embeddings.mean(0)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        projected = centred @ vt[:2].T  # PCA(2) up to sign, which does not change the hull
        assert set(convex_hull_selection(embeddings)) == _monotone_chain(projected)
    inner = np.array([[0, 0], [4, 0], [0, 4], [4, 4], [2, 2]], dtype=float) @ rng.normal(size=(2, 8))
    assert set(convex_hull_selection(inner)) == {0, 1, 2, 3}  # the centre copy is not selected
    assert convex_hull_selection(np.ones((2, 8))) == [0, 1]  # too few copies: keep them all


def test_spelling_noise_misspells_five_percent_of_words():
    text = " ".join(["preference"] * 60)
    noisy = spelling_noise(text, np.random.default_rng(0))
    changed = sum(a != b for a, b in zip(text.split(" "), noisy.split(" ")))
    assert changed == 3  # round(0.05 * 60)
    assert sum(a != b for a, b in zip("one two".split(), spelling_noise("one two", np.random.default_rng(0)).split())) == 1
    assert spelling_noise(text, np.random.default_rng(1)) == spelling_noise(text, np.random.default_rng(1))


@pytest.fixture(scope="module")
def small_hh(tmp_path_factory):
    from zoo.reward_consistency.data import PreferenceDataModule

    dm = PreferenceDataModule(n_test=24, n_train=48, reward_fusion=True, fusion_threshold=0.5, augmentation="convex",
                              augment_pairs=4, max_length=64, eval_batch_size=32, contrast_min_similarity=0.3)
    dm.setup()
    return dm


def test_contrast_set_pairs_different_prompts_and_convex_da_adds_noisy_pairs(small_hh):
    dm = small_hh
    assert dm.num_contrast > 0 and len(dm.plan["instruction"]) == dm.num_contrast
    assert 48 < dm.num_train_pairs <= 48 + 4 * 5
    assert len(dm.plan["rm"]) == 24


def test_evaluation_plan_reproduces_direct_scoring(small_hh):
    """Every compared quantity is the right text, and the de-duplicated table gives each text its own reward."""
    from zoo.lm.heads import SequenceHead
    from zoo.reward_consistency.module import RewardModel

    dm = small_hh
    names = dm.quantity_texts
    for k, (a, b) in enumerate(dm.plan["rm"].tolist()):
        pair = dm.test_pairs[k]
        assert (names[a], names[b]) == (pair["q"] + pair["chosen"], pair["q"] + pair["rejected"])
    for k, (a, b) in enumerate(dm.plan["instruction"].tolist()):
        c = dm.contrast[k]
        assert c["q"] != c["p"] and (names[a], names[b]) == (c["q"] + c["y_q"], c["p"] + c["y_q"])
    responses = {(names[a], names[b]) for a, b in dm.plan["response"].tolist()}
    assert responses == {(c["q"] + c["y_q"], c["q"] + c["y_p"]) for c in dm.contrast if c["y_q"] != c["y_p"]}

    torch.manual_seed(0)
    model = RewardModel(SequenceHead("tiny-bert", num_outputs=1, zero_init=False, hidden_size=32, num_layers=1)).eval()
    with torch.no_grad():
        batch = dm.collate_texts([dm.eval_set[i] for i in range(len(dm.eval_set))])
        table = model.reward(batch["input_ids"], batch["attention_mask"])
        plain = fuse_rewards(table, *dm.plan["plain"], dm.num_quantities)
        for q in (0, dm.num_quantities - 1):  # scored alone, without the padding of a batch
            ids = dm.tokenizer(names[q], truncation=True, max_length=dm.max_length, return_tensors="pt")
            assert plain[q].item() == pytest.approx(model.reward(ids["input_ids"], ids["attention_mask"]).item(), abs=1e-5)
    fused = fuse_rewards(table, *dm.plan["fused"], dm.num_quantities)
    rows, cols, weights = dm.plan["fused"]
    for q in range(dm.num_quantities):  # weights are normalised similarities, the text itself at similarity 1.0
        members = rows == q
        assert weights[members].sum().item() == pytest.approx(1.0, abs=1e-6)
        assert fused[q].item() == pytest.approx((weights[members] * table[cols[members]]).sum().item(), abs=1e-5)
    assert dm.fusion_hit_rate > 0  # with threshold 0.5 some neighbours are found


def test_lora_head_trains_adapters_and_head_only():
    from zoo.lm.heads import SequenceHead

    torch.manual_seed(0)
    model = SequenceHead("tiny-bert", num_outputs=1, zero_init=False, hidden_size=32, num_layers=1, lora_rank=4)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n == "score.weight" for n in trainable)
    ids, mask = torch.tensor([[101, 2023, 102, 0], [101, 7592, 2088, 102]]), torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):  # LoRA's B starts at zero, so A's gradient appears from the second step
        optimizer.zero_grad()
        rewards = model(ids, mask).squeeze(-1)
        bradley_terry_loss(rewards[:1], rewards[1:]).backward()
        optimizer.step()
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if p.requires_grad)
