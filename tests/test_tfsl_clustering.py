"""SLK (transductive few-shot clustering) and the few-shot family.

Golden numbers: the official code, ``imtiazziko/SLK-few-shot`` at commit c2071eb, run here on CPU (numpy) on the
fixed tasks of :func:`task` (3-way, 1 and 2 shots, 6 queries per class, unit-norm 6-d features from
``np.random.default_rng(seed)``): ``train_SLK.create_affinity`` (knn = 3), ``SLK.estimate_sigma``,
``bound_update.bound_update`` (lambda 0.7, 600 iterations) from the K-means unary and the support-clamped softmax
start that ``SLK.SLK`` builds, ``bound_update.entropy_energy``, ``SLK.compute_energy_lapkmode_cont`` (kmeans and MS),
``SLK.MS`` (the mode of cluster 0), ``SLK.SLK`` (kmeans / MS, ``lap_bound`` True with lambda 0.7 / False) and
``train_SLK.metric_class_type`` (CL2N, the query shift, SLK) on a 5-way 2-shot task. The official code keeps the
supports fixed only where each bound update starts, so the comparisons use ``clamp_support=False``; the paper's
constraint (``clamp_support=True``, the default) is tested by its property.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from zoo.fewshot.data import BaseClassDataModule, class_split
from zoo.fewshot.episodes import center_l2, confidence_interval, nearest_prototype, sample_episodes
from zoo.tfsl_clustering.module import (SLK, bound_energy, bound_update, estimate_sigma, knn_affinity,
                                        laplacian_energy, mean_shift, squared_distances, unary_potentials)

GOLDEN = {
    1: {
        "W_neighbours": [[3, 11], [12, 13], [15, 20], [0, 6], [5, 8], [8, 9], [0, 3], [3, 6], [5, 9], [8, 14], [1, 12],
                         [5, 12], [1, 10], [1, 12], [1, 9], [2, 20], [2, 15], [15, 18], [2, 15], [15, 20], [2, 15]],
        "sigma": 0.367463466137676,
        "bound_l": [0, 1, 2, 0, 1, 1, 0, 0, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2],
        "entropy_energy": -19.1404240142178,
        "energy_kmeans": -10.9900801399494,
        "energy_ms": -31.2469714589775,
        "mean_shift_0": [
            -0.06857617703947, 0.07768464690865, 0.3936047744113, 0.4696646307514, -0.5567572943647, 0.3706988146213],
        "bound_Y": [
            [0.8922786459441, 0.07922069044882, 0.0285006636071],
            [0.0340437673107, 0.9472421051351, 0.01871412755416],
            [0.01749278801252, 0.01798112503344, 0.964526086954],
            [0.9105627567037, 0.03047056332704, 0.05896667996923],
            [0.314122297062, 0.6461114264504, 0.03976627648759],
            [0.169516700295, 0.8143105046608, 0.0161727950442],
            [0.8396313737101, 0.03604720379713, 0.1243214224927],
            [0.7542147082693, 0.09104120364207, 0.1547440880886],
            [0.1196931120174, 0.8576035344043, 0.02270335357834],
            [0.07122520896294, 0.9102715550383, 0.01850323599876],
            [0.05725883020972, 0.9143194876681, 0.02842168212219],
            [0.2761235627548, 0.6626934101979, 0.06118302704737],
            [0.05078633842598, 0.9172466954249, 0.03196696614916],
            [0.02388211581444, 0.9429059197053, 0.03321196448023],
            [0.04225625735901, 0.9288122066643, 0.02893153597673],
            [0.01857626731354, 0.02083105025573, 0.9605926824307],
            [0.02465438482923, 0.01566718191143, 0.9596784332593],
            [0.01966439242698, 0.0978733200522, 0.8824622875208],
            [0.01988381767344, 0.03732965556883, 0.9427865267577],
            [0.03278556202667, 0.03035754101825, 0.9368568969551],
            [0.02397928803472, 0.01894842257795, 0.9570722893873],
        ],
        "slk_MS_False_labels": [0, 1, 1, 0, 0, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2],
        "slk_MS_True_labels": [0, 1, 1, 0, 0, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2],
        "slk_kmeans_False_labels": [0, 0, 1, 0, 0, 1, 1, 1, 0, 1, 1, 1, 2, 2, 2, 2, 2, 2],
        "slk_kmeans_True_labels": [0, 1, 1, 0, 0, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2],
    },
    2: {
        "W_neighbours": [[3, 11], [3, 14], [12, 13], [0, 1], [5, 19], [15, 23], [0, 11], [6, 9], [14, 16], [7, 8],
                         [8, 17], [0, 6], [2, 17], [2, 12], [1, 8],
                         [2, 5], [1, 8], [2, 12], [20, 22], [4, 20], [18, 19],
                         [18, 23], [18, 23], [18, 22]],
        "sigma": 0.39214931179753,
        "bound_l": [0, 0, 1, 0, 2, 2, 0, 0, 1, 0, 1, 0, 1, 1, 1, 2, 0, 1, 2, 2, 2, 2, 2, 2],
        "entropy_energy": -19.1668081023834,
        "energy_kmeans": -1.42852169894443,
        "energy_ms": -23.8400784274935,
        "mean_shift_0": [
            0.487799663661, 0.08522813552955, 0.1356740404306, -0.2457603915912, -0.4945880927922, 0.4148734585578],
        "bound_Y": [
            [0.7582846812616, 0.2066602844843, 0.03505503425412],
            [0.4915595603573, 0.4342694323959, 0.07417100724686],
            [0.1395730483091, 0.6467669839023, 0.2136599677886],
            [0.579368499228, 0.3598518673916, 0.0607796333804],
            [0.03968386618088, 0.09523825863745, 0.8650778751817],
            [0.06028091183987, 0.1922518384258, 0.7474672497343],
            [0.7573996240315, 0.1564519635454, 0.08614841242308],
            [0.7698449718366, 0.1270110080679, 0.1031440200955],
            [0.4300382419647, 0.4563040828498, 0.1136576751855],
            [0.7049876321763, 0.2231901600866, 0.07182220773718],
            [0.371227859108, 0.5029878439328, 0.1257842969592],
            [0.745755119303, 0.1643118262039, 0.08993305449314],
            [0.1462217033614, 0.6476171669017, 0.2061611297369],
            [0.1355080461484, 0.6133596656546, 0.2511322881971],
            [0.3603277122972, 0.4863343685447, 0.153337919158],
            [0.09337054833513, 0.3797633558327, 0.5268660958322],
            [0.4945826924979, 0.430894640027, 0.07452266747514],
            [0.1792489687763, 0.6541097687167, 0.166641262507],
            [0.05068740782626, 0.08760568940194, 0.8617069027718],
            [0.04221972181479, 0.07757590505624, 0.880204373129],
            [0.04822248566018, 0.07060808112708, 0.8811694332127],
            [0.06202629299187, 0.118950815484, 0.8190228915241],
            [0.04612435271209, 0.08431520356878, 0.8695604437191],
            [0.03503028281441, 0.0828265991027, 0.8821431180829],
        ],
        "slk_MS_False_labels": [2, 0, 0, 0, 0, 0, 1, 1, 0, 1, 0, 1, 2, 2, 2, 2, 2, 2],
        "slk_MS_True_labels": [0, 0, 0, 0, 1, 0, 1, 1, 0, 1, 0, 1, 2, 2, 2, 2, 2, 2],
        "slk_kmeans_False_labels": [0, 0, 1, 0, 0, 0, 1, 1, 1, 2, 1, 1, 2, 2, 2, 2, 2, 2],
        "slk_kmeans_True_labels": [0, 0, 1, 0, 1, 0, 1, 1, 1, 2, 1, 1, 2, 2, 2, 2, 2, 2],
    },
    "extra": {
        "seed1_slk_kmeans": [0, 0, 0, 2, 0, 0, 2, 1, 2, 1, 1, 2, 2, 2, 2, 2, 1, 2],
        "seed1_slk_MS": [0, 0, 0, 0, 0, 0, 0, 1, 0, 1, 1, 2, 2, 2, 2, 2, 1, 2],
        "metric_kmeans_True": 0.75,
        "metric_MS_True": 0.8,
        "metric_kmeans_False": 0.7,
        "metric_MS_False": 0.8,
    },
}


def task(shot: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x (1, n, 6): supports then queries, the support means (1, 3, 6), support labels) of the golden tasks."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(3, 6))
    support = np.concatenate([centres[k] + 0.8 * rng.normal(size=(shot, 6)) for k in range(3)])
    queries = np.concatenate([centres[k] + 0.8 * rng.normal(size=(6, 6)) for k in range(3)])
    x = np.concatenate([support, queries])
    x = torch.tensor(x / np.linalg.norm(x, axis=1, keepdims=True))[None]
    return x, x[:, : 3 * shot].reshape(1, 3, shot, 6).mean(2), torch.arange(3).repeat_interleave(shot)


def first_bound(x, centres, labels, lmd=0.7, clamp=None):
    unary = squared_distances(x, centres)
    start = torch.softmax(-unary, -1)
    start[:, : len(labels)] = F.one_hot(labels, 3).double()
    affinity = knn_affinity(x, 3)
    return bound_update(unary, start, affinity, lmd, clamp=clamp), unary, affinity


# ------------------------------------------------------------------ parity with the official code
@pytest.mark.parametrize("shot", [1, 2])
def test_affinity_and_sigma_match_the_official_code(shot):
    x, _, _ = task(shot)
    affinity = knn_affinity(x, 3)
    expected = torch.zeros_like(affinity[0]).scatter_(1, torch.tensor(GOLDEN[shot]["W_neighbours"]), 1.0)
    assert torch.equal(affinity[0], expected)
    assert affinity[0].sum(1).eq(2).all() and affinity[0].diagonal().eq(0).all()
    assert estimate_sigma(x, affinity).item() == pytest.approx(GOLDEN[shot]["sigma"], rel=1e-12)


@pytest.mark.parametrize("shot", [1, 2])
def test_bound_update_and_energies_match_the_official_code(shot):
    x, centres, labels = task(shot)
    y, unary, affinity = first_bound(x, centres, labels)
    np.testing.assert_allclose(y[0].numpy(), np.array(GOLDEN[shot]["bound_Y"]), atol=1e-9)
    assert y[0].argmax(-1).tolist() == GOLDEN[shot]["bound_l"]
    assert bound_energy(y, unary, affinity, 0.7).item() == pytest.approx(GOLDEN[shot]["entropy_energy"], rel=1e-10)
    sigma = estimate_sigma(x, affinity)
    for method, key in (("kmeans", "energy_kmeans"), ("kmodes", "energy_ms")):
        energy = laplacian_energy(unary_potentials(x, centres, sigma, method), y, affinity, 0.7).item()
        assert energy == pytest.approx(GOLDEN[shot][key], rel=1e-10)
    mode = mean_shift(x, y.argmax(-1), centres, sigma, 3)[0, 0]
    np.testing.assert_allclose(mode.numpy(), np.array(GOLDEN[shot]["mean_shift_0"]), atol=1e-9)


@pytest.mark.parametrize("shot", [1, 2])
@pytest.mark.parametrize("method,official", [("kmeans", "kmeans"), ("kmodes", "MS")])
@pytest.mark.parametrize("lmd", [0.7, 0.0])
def test_slk_assignments_match_the_official_code(shot, method, official, lmd):
    x, centres, labels = task(shot)
    predicted = SLK(method, lmd=lmd, clamp_support=False).cluster(x, knn_affinity(x, 3), centres, labels)
    assert predicted[0, len(labels):].tolist() == GOLDEN[shot][f"slk_{official}_{lmd > 0}_labels"]


def test_tasks_of_a_batch_iterate_and_stop_as_if_alone():
    tasks = [task(2, seed) for seed in (0, 1)]
    x, centres = torch.cat([t[0] for t in tasks]), torch.cat([t[1] for t in tasks])
    for method, official in (("kmeans", "kmeans"), ("kmodes", "MS")):
        together = SLK(method, clamp_support=False).cluster(x, knn_affinity(x, 3), centres, tasks[0][2])[:, 6:]
        assert together[0].tolist() == GOLDEN[2][f"slk_{official}_True_labels"]
        assert together[1].tolist() == GOLDEN["extra"][f"seed1_slk_{official}"]


@pytest.mark.parametrize("method,official", [("kmeans", "kmeans"), ("kmodes", "MS")])
@pytest.mark.parametrize("lmd", [0.7, 0.0])
def test_the_whole_task_pipeline_matches_official_metric_class_type(method, official, lmd):
    """CL2N with the base mean, the query shift mean(support) - mean(query), kNN graph, SLK; query accuracy."""
    rng = np.random.default_rng(2)
    centres = np.abs(rng.normal(size=(5, 8))) * 2
    gallery = np.concatenate([np.abs(centres[k] + rng.normal(size=(2, 8))) for k in range(5)]).astype(np.float32)
    query = np.concatenate([np.abs(centres[k] + rng.normal(size=(4, 8))) for k in range(5)]).astype(np.float32)
    base_mean = torch.tensor(np.abs(rng.normal(size=8)).astype(np.float32))
    support, query = center_l2(torch.tensor(gallery), base_mean)[None], center_l2(torch.tensor(query), base_mean)[None]
    predicted = SLK(method, lmd=lmd, clamp_support=False)(support, query, ways=5)[0]
    accuracy = (predicted == torch.arange(5).repeat_interleave(4)).double().mean().item()
    assert accuracy == pytest.approx(GOLDEN["extra"][f"metric_{official}_{lmd > 0}"])


# ------------------------------------------------------------------ the paper's mechanism
def test_supervision_constraint_keeps_supports_one_hot_on_their_labels():
    x, centres, labels = task(2)
    free, _, _ = first_bound(x, centres, labels)
    clamped, _, _ = first_bound(x, centres, labels, clamp=labels)
    assert free[0, : len(labels)].argmax(-1).tolist() != labels.tolist()  # the official run lets a support drift
    assert torch.equal(clamped[0, : len(labels)], F.one_hot(labels, 3).double())
    for method in ("kmeans", "kmodes"):
        for lmd in (0.7, 0.0):
            out = SLK(method, lmd=lmd).cluster(x, knn_affinity(x, 3), centres, labels)
            assert out[0, : len(labels)].tolist() == labels.tolist()


@pytest.mark.parametrize("shot", [1, 2])
def test_bound_energy_decreases_over_bound_iterations(shot):
    x, centres, labels = task(shot)
    unary = squared_distances(x, centres)
    affinity = knn_affinity(x, 3)
    affinity = (affinity + affinity.transpose(1, 2)) / 2  # the bound's descent guarantee needs a symmetric W
    y = torch.softmax(-unary, -1)
    energies = []
    for _ in range(30):
        y = bound_update(unary, y, affinity, 0.7, iterations=1, clamp=labels)
        energies.append(bound_energy(y, unary, affinity, 0.7).item())
    assert all(b <= a + 1e-12 for a, b in zip(energies, energies[1:])), energies
    assert energies[-1] < energies[0]


def test_the_laplacian_term_changes_assignments_toward_graph_neighbours():
    """lambda > 0 pulls a point whose neighbours all sit in another cluster into that cluster."""
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.45, 0.0], [0.55, 0.0], [0.56, 0.0]], dtype=torch.float64)[None]
    centres = x[:, :2]
    unary = squared_distances(x, centres)
    affinity = knn_affinity(x, 3)
    start = torch.softmax(-unary, -1)
    plain = bound_update(unary, start, affinity, 0.0, clamp=torch.arange(2)).argmax(-1)[0]
    laplacian = bound_update(unary, start, affinity, 5.0, clamp=torch.arange(2)).argmax(-1)[0]
    assert plain[2].item() == 0 and laplacian[2].item() == 1


# ------------------------------------------------------------------ the few-shot family
def test_episodes_are_n_way_k_shot_disjoint_and_reproducible():
    labels = np.repeat(np.arange(7), 30)
    episodes = sample_episodes(labels, ways=5, shot=3, queries=4, num_episodes=50, seed=3)
    assert episodes.support.shape == (50, 15) and episodes.query.shape == (50, 20)
    for support, query, classes in zip(episodes.support, episodes.query, episodes.classes):
        assert len(set(classes)) == 5 and not set(support) & set(query)
        assert labels[support].tolist() == np.repeat(classes, 3).tolist()  # class-major, label n = classes[n]
        assert labels[query].tolist() == np.repeat(classes, 4).tolist()
    again = sample_episodes(labels, ways=5, shot=3, queries=4, num_episodes=50, seed=3)
    other = sample_episodes(labels, ways=5, shot=3, queries=4, num_episodes=50, seed=4)
    assert np.array_equal(again.support, episodes.support) and np.array_equal(again.query, episodes.query)
    assert not np.array_equal(other.support, episodes.support)
    assert episodes.support_labels.tolist() == np.repeat(np.arange(5), 3).tolist()
    with pytest.raises(ValueError, match="shot"):
        sample_episodes(labels, ways=5, shot=20, queries=15, num_episodes=1)
    with pytest.raises(ValueError, match="ways"):
        sample_episodes(labels, ways=8, shot=1, queries=1, num_episodes=1)


def test_confidence_interval_is_1_96_std_over_sqrt_n():
    accuracies = np.array([0.5, 0.75, 1.0, 0.25, 0.5])
    mean = sum(accuracies) / 5
    std = (sum((a - mean) ** 2 for a in accuracies) / 5) ** 0.5  # population std, as the official code
    assert confidence_interval(accuracies) == pytest.approx((0.6, 1.96 * std / 5 ** 0.5))


def test_cl2n_and_nearest_prototype():
    features = torch.tensor([[3.0, 1.0], [1.0, 5.0], [1.0, 1.0]])
    normalised = center_l2(features, torch.tensor([1.0, 1.0]))
    np.testing.assert_allclose(normalised[:2].numpy(), [[1.0, 0.0], [0.0, 1.0]])
    assert torch.isfinite(normalised).all()
    support = torch.tensor([[[0.0, 0.0], [0.0, 2.0], [10.0, 0.0], [10.0, 2.0]]])  # class 0 around (0, 1)
    query = torch.tensor([[[1.0, 1.0], [6.0, 1.0], [4.0, 1.0]]])
    assert nearest_prototype(support, query, ways=2).tolist() == [[0, 1, 0]]


def test_class_split_separates_base_and_novel_classes():
    split = class_split("cifar10_subset")
    assert sorted(set(split.base[1].tolist())) == [0, 1, 2, 3, 4] and len(split.base[1]) == 5000
    assert sorted(set(split.novel[1].tolist())) == [5, 6, 7, 8, 9] and len(split.novel[1]) == 1000
    assert sorted(set(split.novel_val[1].tolist())) == [5, 6, 7, 8, 9] and len(split.novel_val[1]) == 5000
    relabelled = class_split("cifar10_subset", base_classes=[2, 7])
    assert sorted(set(relabelled.base[1].tolist())) == [0, 1] and 7 not in relabelled.novel[1]
    with pytest.raises(ValueError, match="base_classes"):
        class_split("cifar10_subset", base_classes=[0, 12])
    module = BaseClassDataModule(dataset="cifar10_subset", base_classes=[0, 1, 2, 3, 4], batch_size=4,
                                 steps_per_epoch=2, num_workers=0)
    assert module.num_classes == 5


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="method"):
        SLK("kmedians")
    with pytest.raises(ValueError, match="knn"):
        SLK("kmeans", knn=1)
