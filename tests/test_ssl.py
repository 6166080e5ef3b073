"""The ssl family's shared parts (``zoo/ssl``): losses against their formulas and reference implementations'
definitions, the evaluation metrics against sklearn / numpy / known values, the views, the data module on the stream
contract, the encoders, and that the online probe never reaches the encoder."""
from __future__ import annotations

import colorsys
import math
import os
import random
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from zoo.core.data import FixedLengthSampler, ViewDataset
from zoo.core.datasets import PACS_DOMAINS, load_image_set
from zoo.core.views import apply_op
from zoo.ssl import views as ssl_views
from zoo.ssl.data import SSLDataModule
from zoo.ssl.encoders import MLPHead, feature_dim, timm_encoder
from zoo.ssl.evaluation import (EVAL_SPLITS, FeatureStore, OnlineLinearProbe, deduplicate, evaluate_representation,
                                knn_accuracy, rankme, weighted_knn_predict)
from zoo.ssl.hosts import BYOL, SimCLR
from zoo.ssl.losses import byol_loss, byol_target_decay, nt_xent_loss
from zoo.ssl.views import BYOLViews, MultiView, SimCLRViews, SSLView


def _embeddings(n=6, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, d, generator=g, dtype=torch.float64)


# ----------------------------------------------------------------------------------------------- NT-Xent
def _nt_xent_by_formula(z1, z2, t):
    """Eq. 1 of the SimCLR paper with explicit loops: the 2N views in order (z1_0, z2_0, z1_1, z2_1, ...)."""
    views = [v for pair in zip(z1, z2) for v in pair]
    sim = lambda u, v: float(u @ v / (u.norm() * v.norm()))  # noqa: E731
    total = 0.0
    for i, anchor in enumerate(views):
        positive = i + 1 if i % 2 == 0 else i - 1
        denominator = sum(math.exp(sim(anchor, views[k]) / t) for k in range(len(views)) if k != i)
        total += -math.log(math.exp(sim(anchor, views[positive]) / t) / denominator)
    return total / len(views)


def _lightly_nt_xent(out0, out1, t):
    """lightly's ``NTXentLoss`` (memory bank off, one process) as it defines it: logits [0->1 | 0->0 without the
    diagonal] and [1->0 | 1->1 without the diagonal], labels = the index of the positive, mean cross-entropy."""
    out0, out1 = F.normalize(out0, dim=1), F.normalize(out1, dim=1)
    n = out0.shape[0]
    off_diagonal = ~torch.eye(n, dtype=torch.bool)
    logits_00 = (out0 @ out0.T / t)[off_diagonal].view(n, -1)
    logits_11 = (out1 @ out1.T / t)[off_diagonal].view(n, -1)
    logits = torch.cat([torch.cat([out0 @ out1.T / t, logits_00], 1), torch.cat([out1 @ out0.T / t, logits_11], 1)])
    return F.cross_entropy(logits, torch.arange(n).repeat(2))


def _official_simclr_loss(hidden1, hidden2, t, large_num=1e9):
    """google-research/simclr ``objective.add_contrastive_loss`` (one replica) in torch: ``loss_a + loss_b``."""
    h1, h2 = F.normalize(hidden1, dim=1), F.normalize(hidden2, dim=1)
    n = h1.shape[0]
    masks = torch.eye(n, dtype=h1.dtype)
    labels = torch.arange(n)
    logits_aa = h1 @ h1.T / t - masks * large_num
    logits_bb = h2 @ h2.T / t - masks * large_num
    loss_a = F.cross_entropy(torch.cat([h1 @ h2.T / t, logits_aa], 1), labels)
    loss_b = F.cross_entropy(torch.cat([h2 @ h1.T / t, logits_bb], 1), labels)
    return loss_a + loss_b


@pytest.mark.parametrize("temperature", [0.5, 0.1])
def test_nt_xent_matches_the_formula_lightly_and_the_official_code(temperature):
    z1, z2 = _embeddings()
    loss = nt_xent_loss(z1, z2, temperature).item()
    assert loss == pytest.approx(_nt_xent_by_formula(z1, z2, temperature), rel=1e-5)
    assert loss == pytest.approx(_lightly_nt_xent(z1, z2, temperature).item(), rel=1e-5)
    assert 2 * loss == pytest.approx(_official_simclr_loss(z1, z2, temperature).item(), rel=1e-5)


def test_nt_xent_is_float32_and_rejects_bad_shapes():
    z1, z2 = _embeddings()
    assert nt_xent_loss(z1.bfloat16(), z2.bfloat16()).dtype == torch.float32
    with pytest.raises(ValueError, match="must both be"):
        nt_xent_loss(z1, z2[:3])


def _gather_worker(rank: int, port: int, z1, z2, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    n = z1.shape[0] // 2
    local1 = z1[rank * n:(rank + 1) * n].clone().requires_grad_(True)
    local2 = z2[rank * n:(rank + 1) * n].clone().requires_grad_(True)
    loss = nt_xent_loss(local1, local2, 0.5)
    loss.backward()
    out[rank] = {"loss": loss.item(), "grad1": local1.grad.clone(), "grad2": local2.grad.clone(),
                 "local_only": nt_xent_loss(local1.detach(), local2.detach(), 0.5, gather_negatives=False).item()}
    dist.destroy_process_group()


def test_gathered_negatives_give_the_global_batch_gradient_over_two_processes():
    """Each rank contrasts its anchors with both ranks' views; gradients flow back through the gathered negatives,
    so DDP's average of the ranks' gradients is the single-process gradient of the loss over the global batch."""
    z1, z2 = _embeddings(n=8, d=4, seed=1)
    z1, z2 = z1.float(), z2.float()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_gather_worker, args=(port, z1, z2, out), nprocs=2, join=True)
    g1, g2 = z1.clone().requires_grad_(True), z2.clone().requires_grad_(True)
    global_loss = nt_xent_loss(g1, g2, 0.5)
    global_loss.backward()
    assert (out[0]["loss"] + out[1]["loss"]) / 2 == pytest.approx(global_loss.item(), rel=1e-5)
    # rank r's gradient, averaged by DDP over the 2 ranks, is the global gradient: rank r holds 2 x its rows
    for rank in range(2):
        rows = slice(rank * 4, (rank + 1) * 4)
        torch.testing.assert_close(out[rank]["grad1"] / 2, g1.grad[rows], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(out[rank]["grad2"] / 2, g2.grad[rows], rtol=1e-5, atol=1e-7)
    assert out[0]["local_only"] == pytest.approx(nt_xent_loss(z1[:4], z2[:4], 0.5).item(), rel=1e-5)


# -------------------------------------------------------------------------------------------------- BYOL
def test_byol_loss_is_the_normalised_mse_and_stops_the_target_gradient():
    q, z = _embeddings(n=5, d=3, seed=2)
    q, z = q.clone().requires_grad_(True), z.clone().requires_grad_(True)
    expected = ((q / q.norm(dim=1, keepdim=True) - z / z.norm(dim=1, keepdim=True)) ** 2).sum(dim=1).mean()
    loss = byol_loss(q, z)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert loss.item() == pytest.approx((2 - 2 * F.cosine_similarity(q, z)).mean().item(), rel=1e-6)
    loss.backward()
    assert q.grad is not None and z.grad is None  # no gradient into the target
    assert byol_loss(q, 3 * q).item() == pytest.approx(0.0, abs=1e-6)  # scale-free


def test_byol_target_decay_follows_the_cosine_schedule():
    assert byol_target_decay(0, 1000, 0.996) == pytest.approx(0.996)
    assert byol_target_decay(500, 1000, 0.996) == pytest.approx(0.998)
    assert byol_target_decay(1000, 1000, 0.996) == pytest.approx(1.0)
    k, K = 137, 1000
    assert byol_target_decay(k, K, 0.99) == pytest.approx(1 - 0.01 * (math.cos(math.pi * k / K) + 1) / 2)
    with pytest.raises(ValueError):
        byol_target_decay(0, 0)


# --------------------------------------------------------------------------------------------------- kNN
def test_weighted_knn_by_hand_on_a_tiny_bank():
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[1.0, 0.1]])
    scores = weighted_knn_predict(query, bank, labels, num_classes=2, k=2, temperature=0.07)
    cos = lambda u, v: float(u @ v / (u.norm() * v.norm()))  # noqa: E731
    # the two nearest are bank[0] (cos 0.995, label 0) and bank[2] (cos 0.774, label 1); bank[1] is left out
    expected = [math.exp(cos(query[0], bank[0]) / 0.07), math.exp(cos(query[0], bank[2]) / 0.07)]
    torch.testing.assert_close(scores[0], torch.tensor(expected), rtol=1e-5, atol=0)
    assert weighted_knn_predict(query, bank, labels, 2, k=20).shape == (1, 2)  # k capped at the bank size


def test_weighted_knn_agrees_with_sklearn():
    from sklearn.neighbors import KNeighborsClassifier

    rng = np.random.default_rng(0)
    bank, queries = rng.normal(size=(200, 16)), rng.normal(size=(50, 16))
    bank_labels, query_labels = rng.integers(0, 5, 200), rng.integers(0, 5, 50)
    k, t = 20, 0.07
    sk = KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute",
                              weights=lambda distance: np.exp((1 - distance) / t)).fit(bank, bank_labels)
    scores = weighted_knn_predict(torch.tensor(queries), torch.tensor(bank), torch.tensor(bank_labels), 5, k, t)
    np.testing.assert_allclose((scores / scores.sum(1, keepdim=True)).numpy(), sk.predict_proba(queries), rtol=1e-4)
    np.testing.assert_array_equal(scores.argmax(1).numpy(), sk.predict(queries))
    assert knn_accuracy(torch.tensor(queries), torch.tensor(query_labels), torch.tensor(bank),
                        torch.tensor(bank_labels), 5, k, t) == pytest.approx(sk.score(queries, query_labels))


# ------------------------------------------------------------------------------------------------ RankMe
def test_rankme_matches_numpy_and_its_known_values():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(300, 40)) @ np.diag(np.linspace(1, 0.01, 40))
    s = np.linalg.svd(z, compute_uv=False)
    p = s / s.sum() + 1e-7
    assert rankme(torch.tensor(z)) == pytest.approx(float(np.exp(-(p * np.log(p)).sum())), rel=1e-9)
    rank_one = torch.tensor(rng.normal(size=(100, 1)) @ rng.normal(size=(1, 32)))
    assert rankme(rank_one) == pytest.approx(1.0, abs=1e-3)  # 1 + O(eps log eps)
    assert rankme(torch.eye(64)) == pytest.approx(64.0, rel=1e-4)
    assert rankme(torch.eye(64, dtype=torch.float32)) == rankme(torch.eye(64, dtype=torch.float64))
    with pytest.raises(ValueError):
        rankme(torch.zeros(0, 3))


# ------------------------------------------------------------------------------------- gathering, metrics
def test_deduplicate_undoes_distributed_sampler_padding():
    from torch.utils.data import DistributedSampler

    features = torch.arange(5.0)[:, None] * torch.ones(1, 3)
    shards = [list(DistributedSampler(range(5), num_replicas=2, rank=r, shuffle=False)) for r in range(2)]
    assert shards == [[0, 2, 4], [1, 3, 0]]  # rank 1 repeats sample 0
    gathered = torch.tensor(shards[0] + shards[1])  # what concat_all_gather returns, in rank order
    idx, feats = deduplicate(gathered, features[gathered])
    assert idx.tolist() == [0, 1, 2, 3, 4]
    torch.testing.assert_close(feats, features)


def test_feature_store_and_evaluation_on_separable_features():
    torch.manual_seed(0)
    centres = torch.eye(4, 8) * 10
    bank_labels, test_labels = torch.arange(40) % 4, torch.arange(12) % 4
    bank = {"label": bank_labels, "backbone": centres[bank_labels] + torch.randn(40, 8)}
    store = FeatureStore()
    test_features = centres[test_labels] + torch.randn(12, 8)
    for rows in torch.arange(12).split(5):  # three batches, collected then gathered (one process: identity)
        store.add(rows, test_labels[rows], backbone=test_features[rows], embedding=test_features[rows, :4])
    test = store.gathered()
    assert torch.equal(test["idx"], torch.arange(12)) and torch.equal(test["backbone"], test_features)
    probe = OnlineLinearProbe(8, 4)
    with torch.no_grad():
        probe.linear.weight.copy_(centres)
        probe.linear.bias.zero_()
    metrics = evaluate_representation(bank, test, probe, num_classes=4, rankme_samples=12)
    assert metrics["val/knn_acc"] == 1.0 and metrics["val/linear_acc"] == 1.0
    assert metrics["val/rankme"] == pytest.approx(rankme(test_features[:, :4]))
    assert 1 <= metrics["val/rankme_backbone"] <= 8


# -------------------------------------------------------------------------------------------------- views
@pytest.fixture(scope="module")
def cifar():
    return load_image_set("cifar10_subset", download=False)


def test_views_are_deterministic_per_seed_and_uint8(cifar):
    image = cifar.x_train[0]
    for view in [SSLView(), SSLView(size=24, solarize_p=1.0, brightness_mode="multiplicative")]:
        a, b = view(image, random.Random(7)), view(image, random.Random(7))
        assert a.dtype == np.uint8 and a.shape == ((view.size or 32), (view.size or 32), 3)
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(a, view(image, random.Random(8)))
    with pytest.raises(ValueError, match="uint8 HWC RGB"):
        SSLView()(image.astype(np.float32), random.Random(0))


def test_multiview_through_the_dataset_is_named_chw_uint8_and_the_same_draws(cifar):
    multiview = BYOLViews(local_view=SSLView(size=16, crop_scale=(0.05, 0.4)), num_local_views=2)
    assert multiview.names == ("view1", "view2", "local_0", "local_1")
    dataset = ViewDataset(cifar.x_train[:4], cifar.y_train[:4], multiview.named_views())
    item = dataset[(2, 12345)]
    assert item["idx"] == 2 and item["label"] == int(cifar.y_train[2])
    assert item["view1"].shape == (3, 32, 32) and item["local_0"].shape == (3, 16, 16)
    assert all(item[n].dtype == torch.uint8 for n in multiview.names)
    direct = multiview(cifar.x_train[2], random.Random(12345))  # one rng, views drawn in order
    for name in multiview.names:
        np.testing.assert_array_equal(item[name].permute(1, 2, 0).numpy(), direct[name])
    with pytest.raises(ValueError, match="needs a local_view"):
        MultiView({"view1": SSLView()}, num_local_views=2)


def test_presets_carry_the_papers_parameters():
    byol = BYOLViews().views
    assert (byol["view1"].blur_p, byol["view2"].blur_p, byol["view1"].solarize_p, byol["view2"].solarize_p) == (
        1.0, 0.1, 0.0, 0.2)
    assert (byol["view1"].brightness, byol["view1"].contrast, byol["view1"].saturation, byol["view1"].hue) == (
        0.4, 0.4, 0.2, 0.1)
    simclr = SimCLRViews().views["view1"]  # CIFAR-10: strength 0.5, no blur
    assert (simclr.brightness, simclr.contrast, simclr.saturation, simclr.hue, simclr.blur_p) == pytest.approx(
        (0.4, 0.4, 0.4, 0.1, 0.0))
    for view in (*byol.values(), simclr):
        assert (view.color_jitter_p, view.grayscale_p, view.crop_scale) == (0.8, 0.2, (0.08, 1.0))


def test_view_probabilities_are_applied_per_view(monkeypatch):
    """Blur and solarisation happen with BYOL's per-view probabilities (counted over 3000 draws)."""
    counts = {"blur": 0, "solarize": 0}
    real_blur, real_solarize = ssl_views.gaussian_blur, ssl_views.solarize

    def counting(name, fn):
        def wrapped(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(ssl_views, "gaussian_blur", counting("blur", real_blur))
    monkeypatch.setattr(ssl_views, "solarize", counting("solarize", real_solarize))
    image = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    for name, (blur_p, solarize_p) in {"view1": (1.0, 0.0), "view2": (0.1, 0.2)}.items():
        counts.update(blur=0, solarize=0)
        view = BYOLViews().views[name]
        for seed in range(3000):
            view(image, random.Random(seed))
        assert abs(counts["blur"] / 3000 - blur_p) < 0.03 and abs(counts["solarize"] / 3000 - solarize_p) < 0.03


def test_colour_ops_follow_their_definitions(cifar):
    rng = np.random.default_rng(0)
    pixels = rng.random((200, 3)).astype(np.float32)
    hsv = ssl_views.rgb_to_hsv(pixels)
    np.testing.assert_allclose(hsv, [colorsys.rgb_to_hsv(*p) for p in pixels], atol=1e-5)
    np.testing.assert_allclose(ssl_views.hsv_to_rgb(hsv), pixels, atol=1e-5)
    x = cifar.x_train[1].astype(np.float32) / 255
    np.testing.assert_allclose(ssl_views.adjust_hue(x, 1.0), x, atol=1e-5)  # a full turn of the wheel
    np.testing.assert_allclose(ssl_views.adjust_saturation(x, 1.0), x, atol=1e-5)
    grey = ssl_views.adjust_saturation(x, 0.0)
    assert np.allclose(grey[..., 0], grey[..., 1]) and np.allclose(grey[..., 1], grey[..., 2])
    flat = ssl_views.adjust_contrast(x, 0.0)  # every channel at its mean
    np.testing.assert_allclose(flat, np.broadcast_to(x.mean(axis=(0, 1)), x.shape), atol=1e-6)
    np.testing.assert_allclose(ssl_views.adjust_brightness(x, 0.1, "additive"), x + 0.1, atol=1e-7)
    np.testing.assert_allclose(ssl_views.adjust_brightness(x, 1.5, "multiplicative"), x * 1.5, atol=1e-7)
    # solarisation at 0.5 rounds to the core's uint8 Solarize at 128; grayscale within a grey level of PIL's
    image = cifar.x_train[1]
    solarized = np.rint(ssl_views.solarize(image.astype(np.float32) / 255) * 255).astype(np.uint8)
    np.testing.assert_array_equal(solarized, apply_op(image, "Solarize", 128))
    luma = np.rint(ssl_views.to_grayscale(image.astype(np.float32) / 255) * 255)
    assert np.abs(luma - apply_op(image, "Color", 0.0)).max() <= 1


def test_gaussian_blur_is_normalised_with_zero_padding():
    x = np.ones((9, 9, 3), np.float32)
    blurred = ssl_views.gaussian_blur(x, sigma=1.0, radius=2)
    np.testing.assert_allclose(blurred[2:-2, 2:-2], 1.0, atol=1e-6)  # the kernel sums to one
    assert blurred[0, 0, 0] < blurred[0, 4, 0] < 1.0  # TF's SAME padding: zeros darken the border
    assert ssl_views.gaussian_blur(x, sigma=1.0, radius=0) is x


def test_random_resized_crop_geometry():
    image = np.arange(32 * 32 * 3, dtype=np.uint8).reshape(32, 32, 3)
    full = ssl_views.random_resized_crop(image, random.Random(0), None, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    np.testing.assert_array_equal(full, image)  # the whole image at its own size
    assert ssl_views.random_resized_crop(image, random.Random(0), 20).shape == (20, 20, 3)


# ------------------------------------------------------------------------------------------ data module
def test_data_module_serves_disjoint_shards_of_the_global_batch():
    shards = {}
    for rank in range(2):
        dm = SSLDataModule("cifar10_subset", views=SimCLRViews(), batch_size=8, steps_per_epoch=2, num_workers=0,
                           download=False)
        dm.world = lambda rank=rank: (rank, 2)
        dm.setup()
        batches = list(dm.train_dataloader())
        assert len(batches) == 2 and all(b["view1"].shape == (4, 3, 32, 32) for b in batches)
        assert batches[0]["view2"].dtype == torch.uint8 and set(batches[0]) == {"idx", "label", "view1", "view2"}
        assert torch.equal(batches[0]["label"], torch.from_numpy(dm.data.y_train[batches[0]["idx"].numpy()]))
        shards[rank] = [b["idx"].tolist() for b in batches]
    global_draws = FixedLengthSampler(10000, 16, seed=0).global_draws(0)[0].tolist()
    for step in range(2):
        a, b = shards[0][step], shards[1][step]
        assert not set(a) & set(b)
        assert sorted(a + b) == sorted(global_draws[step * 8:(step + 1) * 8])  # together: the global batch


def test_data_module_evaluation_splits_are_unaugmented_and_labeled():
    dm = SSLDataModule("cifar10_subset", batch_size=8, eval_batch_size=50, bank_size=300, num_workers=0,
                       download=False)
    dm.setup()
    assert dm.steps_per_epoch == 10000 // 8 and dm.num_classes == 10
    bank_loader, test_loader = dm.val_dataloader()  # EVAL_SPLITS order
    assert EVAL_SPLITS == ("bank", "test") and len(bank_loader.dataset) == 300 and len(test_loader.dataset) == 2000
    batch = next(iter(test_loader))
    np.testing.assert_array_equal(batch["image"][0].permute(1, 2, 0).numpy(), dm.data.x_test[0])
    normalised = dm.on_after_batch_transfer(batch, 1)
    assert normalised["image"].dtype == torch.float32 and normalised["label"].dtype == torch.int64
    with pytest.raises(ValueError, match="exceeds"):
        SSLDataModule("cifar10_subset", batch_size=20000, download=False).setup()


def test_offline_imagenette_and_pacs_loaders():
    imagenette = load_image_set("imagenette_subset", download=False)
    assert imagenette.x_train.shape == (800, 64, 64, 3) and imagenette.x_test.shape == (400, 64, 64, 3)
    assert imagenette.num_classes == 10 and imagenette.classes[0] == "tench"
    seen = {}
    for domain in PACS_DOMAINS:
        pacs = load_image_set(f"pacs_unseen_{domain}", download=False)
        assert pacs.x_train.shape == (1344, 64, 64, 3) and pacs.x_test.shape == (448, 64, 64, 3)
        assert pacs.num_classes == 7 and np.bincount(pacs.y_test).tolist() == [64] * 7
        seen[domain] = pacs.x_test
    # the four unseen domains partition PACS
    assert sum(len(x) for x in seen.values()) == 1792
    assert not np.array_equal(seen["photo"][0], seen["sketch"][0])


@pytest.mark.parametrize("name, path", [("imagenette_subset", "imagenette/imagenette_64px_subset.npz"),
                                        ("pacs_unseen_sketch", "pacs/pacs_64px_64per.npz")])
def test_offline_loaders_name_the_missing_file(name, path, tmp_path, monkeypatch):
    from zoo.core.datasets import MissingDatasetError

    monkeypatch.setenv("ZOO_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("ZOO_SHARED_DATA", str(tmp_path / "shared"))
    with pytest.raises(MissingDatasetError, match=path):
        load_image_set(name, download=False)
    with pytest.raises(ValueError, match="unknown PACS domain"):
        from zoo.core.datasets import load_pacs_unseen
        load_pacs_unseen("clipart")


# ------------------------------------------------------------------------------------------ encoders, heads
def test_timm_encoder_with_the_cifar_stem():
    encoder = timm_encoder("resnet18", cifar_stem=True, model_kwargs={"channels": [8, 16, 32, 64]})
    assert encoder.conv1.kernel_size == (3, 3) and encoder.conv1.stride == (1, 1)
    assert isinstance(encoder.maxpool, nn.Identity) and feature_dim(encoder) == 64
    assert encoder(torch.randn(2, 3, 32, 32)).shape == (2, 64)
    with pytest.raises(ValueError, match="timm ResNets"):
        timm_encoder("vit_tiny_patch16_224", cifar_stem=True)
    with pytest.raises(ValueError, match="num_features"):
        feature_dim(nn.Linear(3, 3))


def test_pretrained_weights_offline_fail_with_their_name(tmp_path):
    if os.environ.get("HF_HUB_OFFLINE") != "1":
        pytest.skip("needs HF_HUB_OFFLINE=1 (tests/conftest.py sets it)")
    try:
        timm_encoder("resnet18", pretrained=True)
    except RuntimeError as err:
        assert "timm/resnet18.a1_in1k" in str(err) and "weights_file" in str(err)
    else:
        pytest.skip("the resnet18 weights are in the local Hugging Face cache")
    with pytest.raises(FileNotFoundError, match="not found"):
        timm_encoder("resnet18", weights_file=str(tmp_path / "missing.pth"))


def test_heads_have_the_papers_layers():
    simclr = MLPHead(512, 512, 128, output_batch_norm=True)
    kinds = [type(m).__name__ for m in simclr.layers]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNormNoShift"]
    assert simclr.layers[0].bias is None and simclr.layers[3].bias is None
    byol = MLPHead(512, 4096, 256)
    assert [type(m).__name__ for m in byol.layers] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert byol.layers[3].bias is not None and byol(torch.randn(4, 512)).shape == (4, 256)


# ----------------------------------------------------------------------------------------- hosts
class _TinyEncoder(nn.Module):
    num_features = 6

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x):
        return self.body(x)


def _batch(n=6):
    g = torch.Generator().manual_seed(3)
    return {"view1": torch.randn(n, 3, 8, 8, generator=g), "view2": torch.randn(n, 3, 8, 8, generator=g),
            "label": torch.randint(0, 3, (n,), generator=g), "idx": torch.arange(n)}


@pytest.mark.parametrize("host", [SimCLR, BYOL])
def test_the_online_probe_does_not_change_the_encoders_gradient(host):
    torch.manual_seed(0)
    kwargs = {"projector_hidden_dim": 16, "predictor_hidden_dim": 16} if host is BYOL else {}
    module = host(_TinyEncoder(), num_classes=3, **kwargs)
    module.total_steps = 10  # BYOL's schedule length, set by on_fit_start in a Trainer
    module.train()
    batch = _batch()
    module.training_step(batch, 0).backward()  # SSL loss + probe loss
    with_probe = {n: p.grad.clone() for n, p in module.network.named_parameters()}
    assert module.probe.linear.weight.grad.abs().sum() > 0  # the probe trains
    module.zero_grad(set_to_none=True)
    module.ssl_step(batch)[0].backward()  # the SSL loss alone
    for name, p in module.network.named_parameters():
        torch.testing.assert_close(with_probe[name], p.grad, rtol=0, atol=0, msg=name)
    assert module.probe.linear.weight.grad is None


def test_byol_target_runs_batch_statistics_and_stays_out_of_the_optimiser():
    module = BYOL(_TinyEncoder(), num_classes=3, projector_hidden_dim=16, predictor_hidden_dim=16)
    module.train()
    assert module.target.training and module.target.module.training  # BN on batch statistics, as the official code
    module.eval()
    assert not module.target.module.training
    assert not any(p.requires_grad for p in module.target.parameters())
    assert set(module.teachers()) == {"target"} and module.ema is None
    online = dict(module.online_network().named_parameters())
    assert list(online) == [n for n, _ in module.target.module.named_parameters()]  # the update's order


def test_hosts_reject_a_data_module_that_does_not_fit():
    from types import SimpleNamespace

    module = SimCLR(_TinyEncoder(), num_classes=3)
    dm = SSLDataModule("cifar10_subset", download=False)
    module._trainer = SimpleNamespace(datamodule=dm)
    with pytest.raises(ValueError, match="num_classes=10"):
        module.setup("fit")
    module = SimCLR(_TinyEncoder(), num_classes=10)
    module._trainer = SimpleNamespace(datamodule=SSLDataModule("cifar10_subset", download=False,
                                                               views=MultiView({"a": SSLView()})))
    with pytest.raises(ValueError, match="reads the views"):
        module.setup("fit")


# --------------------------------------------------------------------------------------------- DDP, end to end
def test_two_process_ddp_evaluation_covers_every_rank(tmp_path):
    """SimCLR under 2-process gloo DDP through the real command line: the logged kNN / probe / RankMe values are
    those of the whole (limited) evaluation splits, gathered from both ranks, as one process computes them from
    the final checkpoint."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    from zoo.core.cli import ZooCLI

    root = Path(__file__).resolve().parents[1]
    config = root / "experiments" / "simclr_cifar10_subset.yaml"
    settings = ["--trainer.max_steps=2", "--trainer.enable_progress_bar=false", "--trainer.limit_val_batches=2",
                "--trainer.val_check_interval=null", "--trainer.check_val_every_n_epoch=1",
                "--trainer.num_sanity_val_steps=0", "--data.init_args.batch_size=8",
                "--data.init_args.steps_per_epoch=2", "--data.init_args.num_workers=0",
                "--data.init_args.eval_batch_size=16", "--data.init_args.bank_size=100",
                "--model.init_args.rankme_samples=40"]
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONPATH=f"{root / 'tests'}{os.pathsep}{root}",
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "zoo", "fit", "--config", str(config), "--run.name=ddp", *settings,
           "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    printed = {k: float(v) for k, v in re.findall(r"(val/\w+)\s+([0-9.]+)", out.stdout)}
    assert set(printed) == {"val/knn_acc", "val/linear_acc", "val/rankme", "val/rankme_backbone"}

    cli = ZooCLI(args=["--config", str(config), f"--run.root={tmp_path / 'single'}", "--trainer.logger=false",
                       *settings[6:]], run=False)
    model, dm = cli.model, cli.datamodule
    ckpt = torch.load(tmp_path / "runs" / "ddp" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    dm.setup()
    # 2 batches of 16 on each of 2 ranks, rank r holding samples r, r + 2, ...: together the first 64 of each split
    splits = {"bank": (dm.data.x_train[dm.bank_idx][:64], dm.data.y_train[dm.bank_idx][:64]),
              "test": (dm.data.x_test[:64], dm.data.y_test[:64])}
    gathered = {}
    with torch.no_grad():
        for name, (x, y) in splits.items():
            images = dm.on_after_batch_transfer({"image": torch.from_numpy(x).permute(0, 3, 1, 2)}, 0)["image"]
            features = model.network(images)
            gathered[name] = {"label": torch.from_numpy(y), "backbone": features, "embedding": model.embedding(features)}
    expected = evaluate_representation(gathered["bank"], gathered["test"], model.probe, 10, rankme_samples=40)
    for key, value in expected.items():
        assert printed[key] == pytest.approx(value, abs=2e-4, rel=1e-4), (key, printed, expected)
