"""Transitive invariance (Wang, He & Gupta, ICCV 2017): the ranking loss against the official Caffe layer, the hard-
negative rule, the graph mining (intra-instance, inter-instance and transitive pairs) on hand-built graphs, the DAVIS
patches, and the data module on the zoo's stream contract."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from zoo.transitive_invariance.data import (TransitiveGraphDataModule, davis_patches, davis_root, inter_instance_edges,
                                            intra_instance_edges, mask_box, transitive_pairs)
from zoo.transitive_invariance.module import ranking_hard_loss, select_negatives

# ------------------------------------------------------------------------------------------ golden numbers
# Official code: github.com/xiaolonw/caffe-video_triplet @ c39ea1ad6e937ccf7deba4510b7e555165abf05f,
# src/caffe/layers/rank_hard_loss_layer.cpp (RankHardLossLayer::set_mask / Forward_cpu / Backward_cpu), compiled
# unchanged with minimal stand-ins for Caffe's Blob / LayerParameter (pair_size 2, Dtype double) and run on the inputs
# below: 5 pairs of 4-d unit vectors z = rows of sin(0.7 k + 0.3), k = 0..39, normalised; labels = video of each row.
# hard_ratio 1 and rand_ratio 0 make the selection deterministic (the official random part uses caffe_rng).
LABELS = [0, 0, 1, 1, 2, 2, 1, 1, 3, 3]
GOLDEN = {  # (neg_num, margin): (loss, mask entries (anchor row, negative row), bottom_diff)
    (2, 0.5): (1.480343685330, [(0, 2), (0, 9), (2, 0), (2, 9), (4, 2), (4, 6), (6, 4), (6, 8), (8, 1), (8, 6)], [
        0.004156899107, 0.136709887581, 0.204966079774, 0.176823521967, -0.050748885787, -0.075920724545,
        -0.065385860254, -0.024099004204, -0.062294687528, 0.071375652006, 0.171476907126, 0.190929893425,
        0.075558522754, 0.012605492262, -0.056276098207, -0.098690160352, -0.200993520760, -0.113932419097,
        0.026712879511, 0.154794693485, 0.084120244919, 0.034492688332, -0.031357318540, -0.082459488531,
        -0.180108035376, -0.174570338881, -0.086929484273, 0.041595665099, 0.085818589504, 0.077490679819,
        0.032717692591, -0.027442936692, -0.087092588905, -0.166173857847, -0.167100964905, -0.089437877144,
        0.075842703408, 0.098976089467, 0.075559474105, 0.016606057423]),
    (8, 1.0): (1.754036972718, [(0, j) for j in range(2, 10)] + [(2, j) for j in (0, 1, 4, 5, 8, 9)]
               + [(4, j) for j in (0, 1, 2, 3, 6, 7, 8, 9)] + [(6, j) for j in (0, 1, 4, 5, 8, 9)]
               + [(8, j) for j in range(8)], [
        -0.005883002145, 0.095060599747, 0.151295716215, 0.136374093287, -0.039695072105, -0.101711064036,
        -0.115890753271, -0.075565210400, -0.071713218746, 0.004212832061, 0.078157522123, 0.115343508285,
        0.042827098729, -0.026572304552, -0.083474337798, -0.101117085655, -0.143223140296, -0.087745761710,
        0.008999819673, 0.101512645238, 0.136449868940, 0.063402624754, -0.039463864547, -0.123769881712,
        -0.086680653724, -0.094201119976, -0.057417327571, 0.006370731162, 0.108106230187, 0.100007562992,
        0.044873776261, -0.031364848618, -0.037519375430, -0.100561144947, -0.116307436685, -0.077352523595,
        0.097331264591, 0.148107775668, 0.129226885600, 0.049568572008]),
}


def golden_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    z = np.sin(0.7 * np.arange(40) + 0.3).reshape(10, 4)
    return torch.tensor(z / np.linalg.norm(z, axis=1, keepdims=True)), torch.tensor(LABELS)


@pytest.mark.parametrize("negatives, margin", sorted(GOLDEN))
def test_ranking_loss_matches_the_official_layer(negatives, margin):
    loss_ref, mask_ref, diff_ref = GOLDEN[(negatives, margin)]
    z, labels = golden_inputs()
    z.requires_grad_(True)
    loss = ranking_hard_loss(z, labels, margin, negatives, hard_ratio=1.0, random_ratio=0.0)
    loss.backward()
    assert loss.item() == pytest.approx(loss_ref, abs=1e-6)
    mask = select_negatives(z.detach().float() @ z.detach().float().T, labels, margin, negatives, 1.0, 0.0)
    assert sorted((2 * int(p), int(j)) for p, j in mask.nonzero()) == sorted(mask_ref)
    torch.testing.assert_close(z.grad.flatten(), torch.tensor(diff_ref, dtype=z.dtype), atol=1e-6, rtol=0)


def test_ranking_loss_is_the_paper_formula_with_cosine_distance():
    """Paper Eq. 1 with D = 1 - cos, written out term by term for every selected (anchor, negative)."""
    z, labels = golden_inputs()
    mask = select_negatives(z.float() @ z.float().T, labels, 0.5, 2, 1.0, 0.0)
    distance = 1 - z @ z.T
    expected = sum(max(0.0, distance[2 * p, 2 * p + 1] - distance[2 * p, j] + 0.5)
                   + max(0.0, distance[2 * p, 2 * p + 1] - distance[2 * p + 1, j] + 0.5)
                   for p, j in mask.nonzero().tolist()) / (2 * 2 * 5)
    assert ranking_hard_loss(z, labels, 0.5, 2, 1.0, 0.0).item() == pytest.approx(float(expected), abs=1e-6)


def test_margin_sign_and_same_video_negatives():
    # pair 0: identical anchor/positive; pair 1 orthogonal to it: every triplet satisfied by more than 0.5
    e = torch.eye(4)
    z, labels = torch.stack([e[0], e[0], e[1], e[1]]), torch.tensor([0, 0, 1, 1])
    assert ranking_hard_loss(z, labels, margin=0.5).item() == 0
    # the other pair is closer to the anchor than its own positive: positive loss
    z = torch.stack([e[0], e[1], e[0], e[0]])
    assert ranking_hard_loss(z, labels, margin=0.5).item() > 0
    # ... unless it comes from the anchor's video: never a negative
    assert ranking_hard_loss(z, torch.tensor([0, 0, 0, 0]), margin=0.5).item() == 0


def test_hard_and_random_negatives_are_drawn_as_the_official_set_mask():
    """K = 4, hard_ratio = rand_ratio = 0.5: 2 of the 4 hardest violating negatives, 2 random among the rest."""
    torch.manual_seed(0)
    z = torch.nn.functional.normalize(torch.randn(24, 8), dim=1)
    labels = torch.arange(24) // 2
    similarity = z @ z.T
    generator = torch.Generator().manual_seed(1)
    for _ in range(20):
        mask = select_negatives(similarity, labels, 2.5, 4, 0.5, 0.5, generator)  # margin 2.5 > 2: all violate
        for p in range(12):
            chosen = mask[p].nonzero().flatten()
            others = [j for j in range(24) if labels[j] != labels[2 * p]]
            hardest = sorted(others, key=lambda j: -similarity[2 * p, j])[:4]
            assert len(chosen) == 4 and not set(chosen.tolist()) & {2 * p, 2 * p + 1}
            assert len(set(chosen.tolist()) & set(hardest)) >= 2
    # non-violating candidates are never drawn: with margin 0 only the negatives more similar than the positive
    mask = select_negatives(similarity, labels, 0.0, 4, 0.5, 0.5, generator)
    violating = similarity[0] > similarity[0, 1]
    assert not (mask[0] & ~violating).any()


# ----------------------------------------------------------------------------------------------- the graph
def test_transitive_pairs_on_a_hand_built_graph():
    # instances (A, A'): 0 = (0, 1), 1 = (2, 3), 2 = (4, 5); inter-instance edges 0-1 and 1-2
    instances = np.array([[0, 1], [2, 3], [4, 5]])
    pairs = transitive_pairs(instances, np.array([[0, 1], [1, 2]]))
    assert {tuple(p) for p in pairs.tolist()} == {(0, 2), (0, 3), (1, 2), (1, 3), (2, 4), (2, 5), (3, 4), (3, 5)}
    assert len(pairs) == 8


def test_intra_instance_edges_pair_each_frame_with_the_frame_gap_later_in_its_video():
    video = np.array([0, 0, 0, 0, 1, 1, 1])
    frame = np.array([0, 1, 2, 3, 0, 1, 2])
    assert intra_instance_edges(video, frame, 2).tolist() == [[0, 2], [1, 3], [4, 6]]
    assert intra_instance_edges(video, frame, 5).shape == (0, 2)


def test_inter_instance_edges_are_nearest_neighbours_of_other_videos_within_a_cluster():
    # two well-separated groups (clusters); within each, the nearest instance of another video
    features = np.array([[1, 0, 0], [1, .1, 0], [1, .3, 0], [0, 0, 1], [0, .1, 1], [0, .5, 1]], dtype=float)
    video = np.array([0, 0, 1, 0, 1, 2])
    edges = inter_instance_edges(features, video, num_clusters=2, neighbors=1, seed=0)
    assert edges.tolist() == [[0, 2], [1, 2], [3, 4], [4, 5]]
    assert all(video[p] != video[q] for p, q in edges)


# --------------------------------------------------------------------------------------------- DAVIS patches
def test_mask_box_is_the_tight_box():
    mask = np.zeros((6, 8), np.uint8)
    mask[2:4, 3:7] = 1
    assert mask_box(mask) == (2, 3, 4, 7)
    with pytest.raises(ValueError, match="empty"):
        mask_box(np.zeros((3, 3)))


def test_davis_patches_come_from_the_mask_box_of_the_right_sequence():
    root = davis_root()
    patches, video, frame, boxes = davis_patches(root, 16, ["libby", "car-shadow"])
    assert len(patches) == 49 + 40 and patches.shape[1:] == (16, 16, 3) and patches.dtype == np.uint8
    assert (video[:49] == 0).all() and (video[49:] == 1).all() and frame[49] == 0
    assert ((boxes[:, :2] >= 0) & (boxes[:, 2:] <= (240, 427)) & (boxes[:, 2:] > boxes[:, :2])).all()
    i = 49 + 7  # car-shadow, frame 7: the crop of that frame at that box, resized
    image = Image.open(root / "JPEGImages" / "240p" / "car-shadow" / "00007.jpg").convert("RGB")
    top, left, bottom, right = boxes[i]
    expected = np.asarray(image.resize((16, 16), Image.BILINEAR, box=(left, top, right, bottom)))
    np.testing.assert_array_equal(patches[i], expected)
    mask = np.array(Image.open(root / "Annotations" / "240p" / "car-shadow" / "00007.png"))
    assert mask[top:bottom, left:right].sum() == mask.sum()  # the whole object is inside the box


# ------------------------------------------------------------------------------------------ the data module
STEPS = 3


@pytest.fixture(scope="module")
def graph_data():
    dm = TransitiveGraphDataModule(dataset="digits", patch_size=10, crop_size=8, track_gap=10, num_clusters=2,
                                   sequences=["libby", "car-shadow", "dog"], batch_size=4, steps_per_epoch=STEPS,
                                   mining_encoder={"name": "resnet18", "cifar_stem": True,
                                                   "model_kwargs": {"channels": [4, 8, 8, 8]}},
                                   num_workers=0, download=False)
    dm.trainer = None
    dm.setup("fit")
    return dm


def trainer(dm, epoch=1, step_in_epoch=0, rank=0, world=1, accumulate=1):
    return SimpleNamespace(global_rank=rank, world_size=world, accumulate_grad_batches=accumulate,
                           global_step=(epoch * dm.steps_per_epoch + step_in_epoch) // accumulate, current_epoch=epoch)


def epoch_of(dm, fake_trainer):
    dm.trainer = fake_trainer
    loader = dm.train_dataloader()
    return [(batch["idx"].tolist(), batch["label"].tolist()) for batch in loader]


def test_the_graph_of_the_data_module(graph_data):
    dm = graph_data
    instance_video = dm.video[dm.instances]
    assert (instance_video[:, 0] == instance_video[:, 1]).all()  # intra edges stay in their sequence
    assert len(dm.inter_edges) and (dm.video[dm.instances[dm.inter_edges[:, 0], 0]]
                                    != dm.video[dm.instances[dm.inter_edges[:, 1], 0]]).all()
    assert len(dm.pairs) == len(dm.instances) + 4 * len(dm.inter_edges)
    batch = next(iter(epoch_of_batches(dm)))
    assert batch["anchor"].shape == batch["positive"].shape == (4, 3, 8, 8) and batch["anchor"].dtype == torch.uint8
    assert (batch["video"] == torch.from_numpy(dm.video[dm.pairs[batch["idx"], 0]])).all()


def epoch_of_batches(dm):
    dm.trainer = trainer(dm, epoch=0)
    return dm.train_dataloader()


def test_the_data_module_is_on_the_stream_contract(graph_data):
    dm = graph_data
    whole = epoch_of(dm, trainer(dm))
    halves = [epoch_of(dm, trainer(dm, rank=r, world=2)) for r in (0, 1)]
    assert len(whole) == STEPS
    for step, (idx, labels) in enumerate(whole):
        assert sorted(halves[0][step][0] + halves[1][step][0]) == sorted(idx)
        assert len(halves[0][step][0]) == len(idx) // 2
    # resumed one step into the epoch: the rest of the same batches, the same probe images
    assert epoch_of(dm, trainer(dm, step_in_epoch=1)) == whole[1:]
    with pytest.raises(ValueError, match="not divisible"):
        epoch_of(dm, trainer(dm, world=3))
