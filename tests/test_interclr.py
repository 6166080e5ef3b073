"""InterCLR: the two branches' losses, the inter-image sampling rules and the online clustering, against numbers
produced by running the official code (open-mmlab/mmselfsup, branch 0.x, commit
6faad81607c601ef2fdccd20880fa357730c5805) on fixed inputs, and the behaviour that could silently go wrong.

The golden numbers come from ``InterCLRMoCo.contrast_intra`` / ``contrast_inter``
(``mmselfsup/models/algorithms/interclr_moco.py``, with its ``ContrastiveHead(temperature=0.2)``) and
``InterCLRMemory.init_memory`` / ``update_samples_memory`` / ``update_centroids_memory`` /
``deal_with_small_clusters`` (``mmselfsup/models/memories/interclr_memory.py``), run on CPU in one process with
stubs for mmcv's registries, ``torch.distributed`` and ``.cuda()``; the inputs are the ``torch.Generator`` draws of
:func:`_inputs`. The official sampling draws from the CUDA generator, so the inter-image case is built to be
deterministic: each anchor's label has one bank entry (the positive is that entry) and the semi-hard pool is as
large as the number of negatives and holds no entry of the anchor's label (the negatives are the whole pool).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from zoo.interclr.module import (InterCLR, cluster_means, contrastive_loss, inter_image_logits, intra_image_logits,
                                 kmeans, nearest_centroid, reassign_small_clusters, sample_positives,
                                 sample_semihard_negatives)

B, D, K, N = 3, 8, 5, 12
INTRA_LOSS = 3.02018666267395  # contrast_intra(q, k) with queue (D, K)
INTER_LOSS = {-0.5: 6.815187931060791, 0.0: 9.314136505126953, 0.5: 11.81404972076416}  # contrast_inter, margins
BANK_LABELS = [0, 1, 2, 3, 3, 4, 4, 5, 5, 3, 4, 5]
# InterCLRMemory(length=12, feat_dim=8, momentum=1, num_classes=4, min_cluster=3), init_memory(feats0, LABELS0),
# update_samples_memory([0, 3, 6, 9], new_keys), update_centroids_memory(), deal_with_small_clusters()
LABELS0 = [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
WRITTEN = [0, 3, 6, 9]
LABELS_AFTER_WRITE, CHANGE_RATIO = [2, 0, 0, 1, 1, 1, 2, 2, 2, 2, 3, 3], 0.5
CENTROIDS_AFTER_UPDATE = [
    [0.193621, -0.319526, 0.227822, 0.200334, -0.090526, 0.07669, -0.079995, 0.318433],
    [0.091969, -0.165764, 0.154051, 0.198683, 0.310702, 0.429807, -0.062436, -0.295065],
    [-0.010196, -0.113346, -0.202367, -0.254532, -0.259836, -0.209597, 0.197143, -0.175852],
    [-0.315778, -0.204378, 0.411724, -0.393582, -0.079741, 0.088247, -0.292775, -0.296659]]
LABELS_AFTER_SMALL = [2, 2, 1, 3, 1, 3, 0, 2, 0, 0, 3, 2]
CENTROIDS_AFTER_SMALL = [
    [-0.230613, -0.276981, -0.427637, -0.229202, -0.020824, -0.282225, 0.208842, -0.484427],
    [0.604537, -0.1599, 0.014538, 0.416806, 0.485395, 0.169531, -0.096837, 0.123363],
    [0.026757, -0.109083, 0.302046, -0.201532, -0.507903, -0.088879, -0.13922, 0.141831],
    [-0.21455, -0.174919, 0.258353, -0.134329, 0.138562, 0.478146, 0.058965, -0.360558]]


def _inputs() -> dict[str, torch.Tensor]:
    """The fixed inputs, drawn in the order the official run drew them."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(B, D, generator=g), torch.randn(B, D, generator=g)
    queue = F.normalize(torch.randn(D, K, generator=g), dim=0).T  # the official (D, K) queue, stored here as (K, D)
    bank = F.normalize(torch.randn(N, D, generator=g), dim=1)
    bank[:B] = -F.normalize(q, dim=1)  # each anchor's own entry points away: never in its semi-hard pool
    features0 = torch.randn(N, D, generator=g)
    new_keys = torch.randn(len(WRITTEN), D, generator=g)
    return {"q": q, "k": k, "queue": queue, "bank": bank, "features0": features0, "new_keys": new_keys}


def test_intra_image_loss_matches_official():
    x = _inputs()
    loss = contrastive_loss(*intra_image_logits(x["q"], x["k"], x["queue"]), temperature=0.2)
    assert loss.item() == pytest.approx(INTRA_LOSS, abs=1e-5)


@pytest.mark.parametrize("margin", sorted(INTER_LOSS))
def test_inter_image_loss_matches_official(margin):
    x = _inputs()
    labels, anchors = torch.tensor(BANK_LABELS), torch.arange(B)
    torch.manual_seed(0)
    positives = sample_positives(labels, labels[anchors])
    assert positives.tolist() == anchors.tolist()  # each anchor's label has one entry: its own
    similarity = F.normalize(x["q"], dim=1) @ x["bank"].T
    negatives, valid = sample_semihard_negatives(similarity, labels, labels[anchors], pool_size=6, num_negatives=6)
    loss = contrastive_loss(*inter_image_logits(x["q"], x["bank"], positives, negatives, valid, margin), 0.2)
    assert loss.item() == pytest.approx(INTER_LOSS[margin], abs=1e-5)


def test_margin_relaxes_the_positive():
    """m = -0.5 adds 0.5 to the positive cosine (a *lower* loss than no margin); the wrong sign would raise it."""
    assert INTER_LOSS[-0.5] < INTER_LOSS[0.0] < INTER_LOSS[0.5]
    q, bank = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    positive, negative = inter_image_logits(q, bank, torch.tensor([0]), torch.tensor([[1]]),
                                            torch.tensor([[True]]), margin=-0.5)
    assert positive.item() == pytest.approx(0.6 + 0.5) and negative.item() == pytest.approx(0.0)


def test_semihard_negatives_come_from_the_nearest_pool_and_never_share_the_label():
    torch.manual_seed(0)
    bank_labels = torch.randint(0, 5, (300,))
    anchor_labels = torch.tensor([0, 1, 2, 3])
    similarity = torch.randn(4, 300)
    negatives, valid = sample_semihard_negatives(similarity, bank_labels, anchor_labels, pool_size=40,
                                                 num_negatives=16)
    pool = similarity.topk(40, dim=1).indices
    assert valid.all()
    for row in range(4):
        assert set(negatives[row].tolist()) <= set(pool[row].tolist())  # only the 40 most similar entries
        assert (bank_labels[negatives[row]] != anchor_labels[row]).all()
    # a pool holding only the anchor's label: the official loop would never end; here the draws are masked out
    negatives, valid = sample_semihard_negatives(similarity[:1], torch.zeros(300, dtype=torch.long),
                                                 torch.tensor([0]), pool_size=40, num_negatives=16, max_redraws=3)
    assert not valid.any()
    positive, negative = inter_image_logits(torch.randn(1, 4), F.normalize(torch.randn(300, 4), dim=1),
                                            torch.tensor([0]), negatives, valid, -0.5)
    assert torch.isinf(negative).all() and contrastive_loss(positive, negative, 0.2).item() == pytest.approx(0.0)


def test_positives_share_the_label_and_cover_the_cluster():
    torch.manual_seed(0)
    labels = torch.tensor([2, 0, 1, 2, 0, 2, 1, 2])
    anchors = torch.full((4000,), 2)
    positives = sample_positives(labels, anchors)
    assert (labels[positives] == 2).all()
    counts = torch.bincount(positives, minlength=8)[labels == 2].float()
    assert counts.min() > 0.2 * 4000 / 4  # all four members drawn, roughly uniformly


def test_online_labels_centroids_and_small_clusters_match_official():
    x = _inputs()
    bank = F.normalize(x["features0"], dim=1)
    labels = torch.tensor(LABELS0)
    centroids = cluster_means(bank, labels, torch.zeros(4, D))  # init_memory
    written, keys = torch.tensor(WRITTEN), F.normalize(x["new_keys"], dim=1)
    bank[written] = keys  # bank momentum 1: overwritten
    new_labels = nearest_centroid(keys, centroids)
    assert (new_labels != labels[written]).float().mean().item() == CHANGE_RATIO
    labels[written] = new_labels
    assert labels.tolist() == LABELS_AFTER_WRITE
    centroids = cluster_means(bank, labels, centroids)
    torch.testing.assert_close(centroids, torch.tensor(CENTROIDS_AFTER_UPDATE), atol=2e-6, rtol=0)
    labels, centroids, small = reassign_small_clusters(bank, labels, centroids, min_cluster_size=3)
    assert small == 2 and labels.tolist() == LABELS_AFTER_SMALL
    torch.testing.assert_close(centroids, torch.tensor(CENTROIDS_AFTER_SMALL), atol=2e-6, rtol=0)


def test_kmeans_converges_to_a_partition_with_none_empty():
    """Lloyd's fixed point: every point is nearest its own cluster's mean; no cluster is empty even with more
    clusters than natural groups (emptied clusters restart); the result depends only on the seed."""
    torch.manual_seed(0)
    features = F.normalize(torch.randn(6, 16)[torch.arange(6).repeat_interleave(50)] + 0.3 * torch.randn(300, 16),
                           dim=1)
    labels = kmeans(features, 10, iterations=50, seed=1)
    assert torch.bincount(labels, minlength=10).min() > 0
    means = cluster_means(features, labels, torch.zeros(10, 16))
    assert torch.equal(torch.cdist(features, means).argmin(dim=1), labels)
    assert torch.equal(kmeans(features, 10, iterations=50, seed=1), labels)


class _TinyEncoder(nn.Module):
    num_features = 16

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 16), nn.BatchNorm1d(16), nn.ReLU())

    def forward(self, x):
        return self.body(x)


def _module(**kwargs) -> InterCLR:
    torch.manual_seed(0)
    model = InterCLR(_TinyEncoder(), queue_length=10, feature_dim=8, num_clusters=3, min_cluster_size=2,
                     num_negatives=4, semihard_pool=6, centroid_update_interval=1, **kwargs)
    if model.uses_bank:  # a filled bank of 12 images in 3 clusters (what fill_bank leaves)
        bank, labels = F.normalize(torch.randn(12, 8), dim=1), torch.arange(12) % 3
        model.bank, model.bank_labels = bank, labels
        model.centroids.copy_(cluster_means(bank, labels, model.centroids))
    return model


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"view1": torch.randn(4, 3, 4, 4, generator=g), "view2": torch.randn(4, 3, 4, 4, generator=g),
            "idx": torch.tensor([1, 5, 7, 11]), "label": torch.zeros(4, dtype=torch.long)}


def test_step_combines_the_branches_and_advances_queue_and_bank():
    model = _module()
    queue_before, bank_before = model.queue.clone(), model.bank.clone()
    loss, features, logs = model.ssl_step(_batch())
    assert loss.item() == pytest.approx(0.75 * logs["intra_loss"].item() + 0.25 * logs["inter_loss"].item())
    with torch.no_grad():
        keys = F.normalize(model.key_encoder(_batch()["view2"]), dim=1)
    # queue: slots 0..3 now hold this step's keys, the pointer moved on by the batch, the rest untouched
    assert model.queue_pointer.item() == 4
    torch.testing.assert_close(model.queue[:4], keys)
    torch.testing.assert_close(model.queue[4:], queue_before[4:])
    # bank: the batch's entries overwritten by their keys, the others untouched; labels = nearest centroid
    idx = _batch()["idx"]
    torch.testing.assert_close(model.bank[idx], keys)
    untouched = torch.ones(12, dtype=torch.bool)
    untouched[idx] = False
    torch.testing.assert_close(model.bank[untouched], bank_before[untouched])
    assert len(features) == 1 and features[0].shape == (4, 16)
    loss.backward()
    assert model.neck.layers[0].weight.grad.abs().sum() > 0


def test_online_labels_follow_the_written_keys():
    model = _module(small_cluster_interval=1000)
    idx = torch.tensor([0, 4])
    keys = F.normalize(model.centroids[[2, 0]], dim=1)  # each key sits on a centroid other than its entry's
    logs = model.update_bank(idx, keys)
    assert model.bank_labels[idx].tolist() == [2, 0] and logs["label_change_ratio"].item() == 1.0
    torch.testing.assert_close(model.centroids, cluster_means(model.bank, model.bank_labels, torch.zeros(3, 8)))


def test_queue_wraps_around():
    model = _module()
    for _ in range(3):
        model.enqueue(F.normalize(torch.randn(4, 8), dim=1))
    assert model.queue_pointer.item() == 12 % 10


def test_moco_baseline_has_no_inter_branch():
    model = _module(intra_weight=1.0, inter_weight=0.0)
    loss, _, logs = model.ssl_step(_batch())
    assert "inter_loss" not in logs and loss.item() == pytest.approx(logs["intra_loss"].item())
    assert model.bank.numel() == 0 and model.centroids.numel() == 0  # no bank kept at all
    assert model.queue_pointer.item() == 4


def test_a_checkpoints_bank_loads_into_a_module_built_outside_a_trainer():
    """The offline tools (zoo.ssl.bank.load_module) build the module without a data module, so its bank is empty
    until the checkpoint's state fills it: the bank and its labels take the checkpoint's size and values."""
    from zoo.ssl.encoders import timm_encoder

    def build():
        torch.manual_seed(0)
        return InterCLR(timm_encoder("resnet18", cifar_stem=True, model_kwargs={"channels": [4, 8, 8, 8]}),
                        queue_length=16, num_clusters=2, semihard_pool=4, num_negatives=2)

    trained = build()
    trained.bank = F.normalize(torch.randn(6, trained.bank.shape[1]), dim=1)
    trained.bank_labels = torch.tensor([0, 1, 0, 1, 1, 0])
    fresh = build()
    assert len(fresh.bank) == 0
    fresh.load_state_dict(trained.state_dict())
    assert torch.equal(fresh.bank, trained.bank) and torch.equal(fresh.bank_labels, trained.bank_labels)
