"""SSL for item recommendations (Yao et al., CIKM 2021) and the interactions family (zoo.recsys).

There is no official code (Google internal), so the losses and augmentations are checked against the paper's
formulas, written out here with numpy loops (Yi et al. 2019 Eq. 3 for the log-Q corrected batch softmax; Yao et al.
Sec. 3.1 for the SSL loss, Sec. 3.3 for CFM/RFM), plus the behaviour that could silently go wrong: masks that leak or
overlap, CFM groups that ignore the MI, a log-Q correction of the wrong sign, a tail slice on the wrong items.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from sklearn.metrics import mutual_info_score
from torchmetrics.retrieval import RetrievalRecall

from zoo.recsys.data import InteractionsDataModule, load_movielens100k, multi_valued
from zoo.recsys.evaluation import RecallAtK, long_tail_items
from zoo.recsys.towers import FeatureEmbedding, Tower
from zoo.ssl_two_tower_cfm.masking import (correlated_groups, correlated_masks, drop_values,
                                           feature_mutual_information, random_masks)
from zoo.ssl_two_tower_cfm.module import SSLTwoTower, batch_softmax_loss, ssl_infonce_loss


# ------------------------------------------------------------------------------------------- losses
def test_batch_softmax_with_logq_matches_the_formula():
    g = torch.Generator().manual_seed(0)
    u = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=1)
    v = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=1)
    p = torch.tensor([0.3, 0.01, 0.1, 0.05, 0.2])
    tau = 0.05
    expected = 0.0
    for i in range(5):  # s^c(x_i, y_j) = <u_i, v_j> / tau - log p_j;  L = -1/N sum_i log softmax_j s^c[i]
        s = np.array([(u[i] @ v[j]).item() / tau - np.log(p[j].item()) for j in range(5)])
        expected -= s[i] - np.log(np.exp(s - s.max()).sum()) - s.max()
    got = batch_softmax_loss(u, v, p.log(), tau)
    assert got.item() == pytest.approx(expected / 5, rel=1e-5)


def test_logq_correction_pushes_popular_negatives_down():
    """Correct sign: a negative that is more likely to be sampled gets a lower corrected logit, so the same scores
    give a smaller loss; a uniform q changes nothing (a constant shift)."""
    u = torch.eye(3)
    v = torch.tensor([[0.5, 0.5, 0.0], [0.6, 0.4, 0.0], [0.0, 0.0, 1.0]])
    plain = batch_softmax_loss(u, v, None, 1.0)
    assert batch_softmax_loss(u, v, torch.full((3,), 1 / 3).log(), 1.0).item() == pytest.approx(plain.item())
    popular_second = torch.tensor([0.1, 0.8, 0.1]).log()
    assert batch_softmax_loss(u[:1], v, popular_second, 1.0) < batch_softmax_loss(u[:1], v, None, 1.0)
    # and the positive's own correction lifts rare positives: the same scores, a rarer positive -> smaller loss
    rare_first = torch.tensor([0.01, 0.495, 0.495]).log()
    assert batch_softmax_loss(u[:1], v, rare_first, 1.0) < batch_softmax_loss(u[:1], v, None, 1.0)


def test_ssl_loss_matches_the_paper():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    tau = 0.1
    cos = lambda x, y: (x @ y / (x.norm() * y.norm())).item()  # noqa: E731
    expected = 0.0
    for i in range(4):  # -1/N sum_i log exp(s(z'_i, z''_i)/tau) / sum_j exp(s(z'_i, z''_j)/tau)
        logits = np.array([cos(a[i], b[j]) / tau for j in range(4)])
        expected -= logits[i] - np.log(np.exp(logits).sum())
    assert ssl_infonce_loss(a, b, b, tau).item() == pytest.approx(expected / 4, rel=1e-5)


# ------------------------------------------------------------------------------------------- masking
def _correlated_table(n=400, seed=0):
    """5 features: a and b carry the same values, c and d too, e is independent noise."""
    rng = np.random.default_rng(seed)
    x, y = rng.integers(1, 6, n), rng.integers(1, 4, n)
    return {"a": x[:, None], "e": rng.integers(1, 5, n)[:, None], "c": y[:, None], "b": (x % 5 + 1)[:, None],
            "d": (y + 10)[:, None]}


def test_mutual_information_of_single_valued_features_is_sklearns():
    table = _correlated_table()
    mi = feature_mutual_information(table)
    names = list(table)
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            assert mi[i, j] == pytest.approx(mutual_info_score(table[a][:, 0], table[b][:, 0]), abs=1e-12)


def test_mutual_information_of_a_multi_valued_feature_spreads_each_row_over_its_pairs():
    sets = np.array([[1, 2], [1, 0], [2, 0], [2, 0]])  # {1,2}, {1}, {2}, {2}
    single = np.array([[1], [1], [2], [2]])
    # joint over (set value, single value): row 0 gives 1/2 to (1,1) and (2,1); rows 1..3 one each; total 4
    joint = np.array([[1.5, 0.0], [0.5, 2.0]]) / 4
    px, py = joint.sum(1), joint.sum(0)
    nz = joint > 0
    expected = (joint[nz] * np.log(joint[nz] / np.outer(px, py)[nz])).sum()
    assert feature_mutual_information({"sets": sets, "single": single})[0, 1] == pytest.approx(expected)


def test_cfm_groups_follow_the_mutual_information():
    groups = correlated_groups(feature_mutual_information(_correlated_table()))  # order a, e, c, b, d
    assert groups.shape == (5, 2)
    assert groups[0].tolist() == [0, 3] and groups[3].tolist() == [3, 0]  # a <-> b
    assert groups[2].tolist() == [2, 4] and groups[4].tolist() == [4, 2]  # c <-> d
    assert groups[1, 0] == 1  # the noise feature is its own seed


def test_cfm_masks_hide_the_seed_group_and_views_are_complementary():
    groups = correlated_groups(feature_mutual_information(_correlated_table()))
    keep = correlated_masks(groups, 2000, torch.Generator().manual_seed(0))
    hidden_sets = {tuple(sorted(np.flatnonzero(~row).tolist())) for row in keep.numpy()}
    assert hidden_sets == {tuple(sorted(g)) for g in groups.tolist()}
    view1, view2 = keep, ~keep  # every feature is seen by exactly one view
    assert (view1.int() + view2.int() == 1).all() and ((~keep).sum(1) == 2).all()
    seeds = torch.tensor([sorted(np.flatnonzero(~r).tolist()) for r in keep.numpy()])
    assert set(np.unique(seeds[:, 0]).tolist()) >= {0, 1, 2}  # seeds are drawn over every feature


def test_rfm_masks_hide_a_uniform_half():
    keep = random_masks(6, 6000, torch.Generator().manual_seed(0))
    assert ((~keep).sum(1) == 3).all()
    assert torch.allclose((~keep).float().mean(0), torch.full((6,), 0.5), atol=0.03)
    assert len({tuple(r) for r in keep.int().tolist()}) == 20  # all C(6, 3) halves occur


def test_dropout_touches_only_multi_valued_values():
    features = {"genres": torch.randint(1, 9, (4000, 5)), "year": torch.randint(1, 9, (4000, 1))}
    features["genres"][:, 4] = 0  # padding stays padding
    out = drop_values(features, ("genres",), 0.25, torch.Generator().manual_seed(0))
    assert torch.equal(out["year"], features["year"]) and (out["genres"][:, 4] == 0).all()
    kept = out["genres"][:, :4] == features["genres"][:, :4]
    assert (out["genres"][:, :4][~kept] == 0).all() and abs((~kept).float().mean().item() - 0.25) < 0.02


def test_a_masked_feature_does_not_leak_into_the_tower():
    torch.manual_seed(0)
    tower = Tower(FeatureEmbedding({"a": 10, "b": 10, "c": 10}, 4, maskable=True), 4, (8,), 3)
    x = {"a": torch.tensor([[1], [2]]), "b": torch.tensor([[3], [3]]), "c": torch.tensor([[5, 6], [7, 0]])}
    keep = torch.tensor([[True, False, True], [True, False, True]])
    changed = {**x, "b": torch.tensor([[9], [1]])}
    assert torch.equal(tower(x, keep), tower(changed, keep))
    assert not torch.equal(tower(x), tower(changed))


# ------------------------------------------------------------------------------------------- evaluation
def test_long_tail_items_are_the_least_popular_holding_the_share():
    counts = np.array([50, 1, 0, 30, 2, 10, 7])  # total 100
    tail = long_tail_items(counts, 0.2)
    assert tail.tolist() == [False, True, True, False, True, True, True]  # 0+1+2+7+10 = 20 <= 20
    assert counts[tail].sum() <= 20 and counts[~tail].min() >= counts[tail].max()


def test_recall_matches_torchmetrics_and_excludes_training_positives():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(6, 30, generator=g)
    train = torch.rand(6, 30, generator=g) < 0.2
    test = (torch.rand(6, 30, generator=g) < 0.15) & ~train
    test[5] = False  # a user without test items is skipped
    tail = torch.zeros(30, dtype=torch.bool)
    tail[::3] = True
    metric = RecallAtK(tail, ks=(5, 10))
    metric.update(scores[:4], train[:4], test[:4])
    metric.update(scores[4:], train[4:], test[4:])
    got = metric.compute()
    masked = scores.masked_fill(train, float("-inf"))
    indexes = torch.arange(6)[:, None].expand(6, 30)
    for prefix, target in (("", test), ("tail_", test & tail)):
        for k in (5, 10):
            reference = RetrievalRecall(top_k=k, empty_target_action="skip")(masked, target, indexes=indexes)
            assert got[f"{prefix}recall@{k}"].item() == pytest.approx(reference.item(), abs=1e-6)


def test_tail_recall_counts_only_tail_test_items():
    scores = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0]])
    train = torch.tensor([[True, False, False, False, False]])  # item 0 is excluded: top-2 = items 1, 2
    test = torch.tensor([[False, True, False, False, True]])  # item 1 (head) is found, item 4 (tail) is not
    tail = torch.tensor([False, False, False, True, True])
    metric = RecallAtK(tail, ks=(2,))
    metric.update(scores, train, test)
    got = metric.compute()
    assert got["recall@2"].item() == pytest.approx(0.5) and got["tail_recall@2"].item() == 0.0


# ------------------------------------------------------------------------------------------- data
def test_movielens100k_official_splits():
    u1 = load_movielens100k("u1")
    assert (len(u1.train), len(u1.test)) == (80_000, 20_000) and (u1.num_users, u1.num_items) == (943, 1682)
    assert not set(map(tuple, u1.train.tolist())) & set(map(tuple, u1.test.tolist()))
    ua = load_movielens100k("ua")
    assert (np.bincount(ua.test[:, 0]) == 10).all()
    toy_story = u1.item_features["genres"][0]
    assert (toy_story > 0).sum() == 3  # Animation, Children's, Comedy
    assert u1.item_features["decade"][0] != 0 and u1.schema()["user"]["gender"] == 3


def test_multi_valued_drops_rare_values_and_pads():
    codes = multi_valued([["x", "y"], ["x"], ["z", "x", "x"]], min_count=2)
    assert codes.tolist() == [[1], [1], [1]]


def test_item_stream_is_uniform_over_the_corpus_and_interactions_follow_popularity():
    dm = InteractionsDataModule(batch_size=500, item_batch_size=841, steps_per_epoch=2)
    dm.setup("fit")
    loader = dm.train_dataloader()
    streams = loader.flattened
    items = torch.cat([b["idx"] for b in streams[1]])
    assert torch.equal(items.sort().values, torch.arange(1682))  # one epoch = a permutation of the catalog
    batch = next(iter(streams[0]))
    pairs = torch.from_numpy(dm.data.train)[batch["idx"]]
    assert torch.equal(batch["item_id"], pairs[:, 1])
    assert torch.equal(batch["item"]["item_id"][:, 0], pairs[:, 1] + 1)
    assert torch.equal(batch["user"]["user_id"][:, 0], pairs[:, 0] + 1)


def test_validation_split_is_carved_from_training_and_subsample_is_fixed():
    u1 = load_movielens100k("u1")
    val = u1.holdout(0.1, seed=0)
    as_set = lambda pairs: set(map(tuple, pairs.tolist()))  # noqa: E731
    assert as_set(val.train) | as_set(val.test) == as_set(u1.train)  # a partition of the training interactions
    assert not as_set(val.train) & as_set(val.test) and not as_set(val.test) & as_set(u1.test)  # test split unused
    assert abs(len(val.test) / len(u1.train) - 0.1) < 0.01
    sparse = u1.subsample(0.25, seed=1)
    assert as_set(sparse.train) <= as_set(u1.train) and np.array_equal(sparse.test, u1.test)
    assert abs(len(sparse.train) / len(u1.train) - 0.25) < 0.01
    assert np.array_equal(sparse.train, u1.subsample(0.25, seed=1).train)  # fixed by the seed
    dm = InteractionsDataModule(validation_fraction=0.1, train_fraction=0.25, seed=3)
    dm.setup("fit")  # the training seed does not move the split: same held-out and kept pairs as split_seed 0
    assert np.array_equal(dm.data.test, val.test) and np.array_equal(dm.data.train, val.subsample(0.25, 1).train)


def _attached_module(**kwargs) -> tuple[SSLTwoTower, InteractionsDataModule]:
    dm = InteractionsDataModule()
    module = SSLTwoTower(**kwargs)
    module.trainer = SimpleNamespace(datamodule=dm)  # setup only reads the data module
    module.setup("fit")
    return module, dm


def test_ssl_gradient_reaches_the_shared_item_tower_and_evaluation_is_unmasked():
    torch.manual_seed(0)
    module, dm = _attached_module()
    items = dm.item_set.collate(list(range(128)))["item"]
    keep = module.view_masks(128)
    view1, view2 = module.network["item"](items, keep), module.network["item"](items, ~keep)
    assert not torch.allclose(view1, view2, atol=1e-3)  # the two views of an item differ
    module.ssl_loss(items).backward()
    grads = {name: p.grad for name, p in module.network.named_parameters()}
    assert all(grads[n] is None for n in grads if n.startswith("query."))  # SSL is item-side only
    for name in ("item.embedding.tables.item_id.weight", "item.embedding.tables.genres.weight",
                 "item.embedding.default", "item.mlp.0.weight"):  # the tower retrieval uses, and the defaults
        assert grads[name] is not None and grads[name].abs().sum() > 0, name
    module.zero_grad()
    module.main_loss(dm.train_set.collate(list(range(128)))).backward()
    assert module.network["item"].embedding.default.grad is None  # the main task never sees a masked feature
    module.on_validation_epoch_start()
    catalog = {name: codes for name, codes in dm.items.items()}
    unmasked = torch.nn.functional.normalize(module.network["item"](catalog), dim=-1)
    assert torch.allclose(module.item_bank, unmasked.detach())


def test_item_id_is_every_features_top_correlate_so_cfm_hides_it_with_most_seeds():
    """The MovieLens items have 5 features and one of them is the id: MI(id, f) = H(f) (for a single-valued f), the
    largest MI f can have, so CFM (the paper's rule, Sec. 3.3) pairs every other seed with the id (decade ties with year and keeps it),
    and view 1 hides the id with probability 4/5 (year, genres, title_words and the id itself as seeds)."""
    items = load_movielens100k("u1").item_features
    mi = feature_mutual_information(items)
    names = list(items)
    assert np.allclose(mi[0, 1:3], np.diag(mi)[1:3])  # MI(item_id, f) = H(f) for the single-valued year, decade
    for f in range(1, len(names)):  # and the id is every feature's top correlate (decade: tied with year)
        assert mi[f, 0] >= max(mi[f, g] for g in range(1, len(names)) if g != f) - 1e-9, names[f]
    groups = correlated_groups(mi).tolist()
    assert sum(names.index("item_id") in group for group in groups) == 4
