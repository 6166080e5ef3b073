"""GroCo (zoo/groco): the group-ordering loss against the official code, and the behaviour it must have.

Golden numbers: produced by running the official loss, ``learning_by_sorting.losses.groco.GroCo.forward`` of
github.com/ninatu/learning_by_sorting at commit 47c074ea9c6c1afe02761bbddfdcd5e61d61ee6f, with diffsort 0.2.0, on
the embeddings of :func:`_views` (``output = {"projection_image_aug<i>": views[i - 1]}``, ``distributed=False``),
then ``loss.backward()``; gradients are those of the views.
"""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from zoo.groco import GroCo, group_ordering_loss, group_scores


def _views(num_views: int, batch: int = 6, dim: int = 8, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, dim, generator=generator, dtype=torch.float64).float().requires_grad_()
            for _ in range(num_views)]


def _groco_over_views(views, num_positive_views=None, topk=3, stop_gradient=True, steepness=1.0, gather=True):
    """The module's loss on given embeddings: each view the anchor in turn, mean over anchors (GroCo.ssl_step)."""
    num_positive_views = num_positive_views or len(views)
    losses = [group_ordering_loss(group_scores(views[a], [views[p] for p in range(num_positive_views) if p != a],
                                               topk, stop_gradient, gather), topk, steepness)
              for a in range(len(views))]
    return torch.stack(losses).mean()


# (case, official GroCo arguments, loss, {view: (grad[0, :4], grad[5, -2:])}); batch 6, dim 8, topk_neg 3
GOLDEN = [
    ("two_views", dict(n_augs=2), 0.51584392786026,
     {0: ([0.0029254423, 0.0006371805, -0.0021022037, 0.0016703944], [0.0024075129, -0.0025143446]),
      1: ([0.0018125859, -0.0004561151, 0.0005718284, -0.0007668626], [0.0023151895, 0.0004263645])}),
    ("two_views_without_stop_gradient", dict(n_augs=2, stop_grad=False), 0.51584392786026,
     {0: ([0.006045165, 0.0022093456, -0.0041133403, 0.0035444989], [0.0053911726, -0.0052633467]),
      1: ([0.0035744093, -0.0015276469, 0.0007450303, -0.0011928363], [0.0035344232, 0.000603098])}),
    ("multicrop_2_global_2_local", dict(n_augs=4, n_pos_augs=2), 0.5195891261100769,
     {0: ([0.0014627211, 0.0003185903, -0.0010511018, 0.0008351972], [0.0012037564, -0.0012571723]),
      2: ([0.0019108321, -7.75651e-05, -0.0007367608, -0.0006863597], [0.0024260057, -0.0016241624]),
      3: ([0.0022626605, 0.0005566248, 0.000390621, 0.0007875313], [0.0022158802, -0.002498345])}),
    ("three_views_steepness_2", dict(n_augs=3, steepness=2), 0.6227551102638245,
     {1: ([0.0022921904, -0.0017753799, 0.0013724287, -0.0019125841], [0.0038787054, 0.00160345]),
      2: ([0.005486764, -0.0004730995, -0.0030531404, -0.0023375633], [0.0073246881, -0.0046781627])}),
]


@pytest.mark.parametrize("case, official, loss, grads", GOLDEN, ids=[g[0] for g in GOLDEN])
def test_loss_and_gradients_match_the_official_code(case, official, loss, grads):
    views = _views(official["n_augs"])
    ours = _groco_over_views(views, official.get("n_pos_augs"), topk=3, stop_gradient=official.get("stop_grad", True),
                             steepness=official.get("steepness", 1.0))
    ours.backward()
    assert ours.item() == pytest.approx(loss, rel=1e-6)
    for view, (first_row, last_row) in grads.items():
        torch.testing.assert_close(views[view].grad[0, :4], torch.tensor(first_row), rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(views[view].grad[5, -2:], torch.tensor(last_row), rtol=1e-5, atol=1e-9)


# ------------------------------------------------------------------------------------------------ the scores
def test_scores_hold_the_hardest_negatives_then_the_positives_in_ascending_order():
    anchors, positive_a, positive_b = _views(3, batch=7, dim=5, seed=3)
    scores = group_scores(anchors, [positive_a, positive_b], topk_negatives=4)
    assert scores.shape == (7, 4 + 2)
    cosine = nn.functional.normalize(anchors, dim=1) @ nn.functional.normalize(anchors, dim=1).T
    for i in range(7):
        others = torch.cat([cosine[i, :i], cosine[i, i + 1:]])  # the anchor itself is never its own negative
        torch.testing.assert_close(scores[i, :4], others.sort().values[-4:])  # the 4 most similar, ascending
        positives = torch.stack([nn.functional.cosine_similarity(anchors[i], p[i], dim=0)
                                 for p in (positive_a, positive_b)])
        torch.testing.assert_close(scores[i, 4:], positives.sort().values)


def test_topk_picks_the_most_similar_negatives():
    """Images 1 and 2 are near-copies of anchor 0's direction: they are its two hardest negatives."""
    anchors = torch.tensor([[1.0, 0, 0], [0.9, 0.1, 0], [0.8, 0, 0.2], [0, 1.0, 0], [0, 0, 1.0], [-1.0, 0, 0]])
    scores = group_scores(anchors, [anchors + 0.01], topk_negatives=2)
    expected = nn.functional.cosine_similarity(anchors[0:1], anchors[[2, 1]])  # ascending: image 2, then image 1
    torch.testing.assert_close(scores[0, :2], expected)


# -------------------------------------------------------------------------------------------------- the loss
def test_loss_falls_as_positives_rise_above_the_negatives():
    negatives = torch.tensor([[-0.2, 0.0, 0.1]])
    losses = [group_ordering_loss(torch.cat([negatives, torch.tensor([[margin]])], dim=1), 3).item()
              for margin in (-0.5, 0.0, 0.2, 0.6, 1.0)]
    assert losses == sorted(losses, reverse=True) and losses[0] > losses[-1] + 0.1
    # in the hard-sorting limit, scores already in the ground-truth order cost nothing and reversed ones a lot
    ordered = torch.tensor([[-0.3, -0.1, 0.4, 0.8]])
    assert group_ordering_loss(ordered, 2, steepness=1e4).item() < 1e-3
    assert group_ordering_loss(ordered.flip(1), 2, steepness=1e4).item() > 5


def test_stop_gradient_sends_gradient_to_the_anchor_side_only():
    anchors, positives = _views(2, batch=5, dim=4, seed=4)
    scores = group_scores(anchors, [positives], topk_negatives=3, stop_gradient=True)
    group_ordering_loss(scores[:1], 3).backward()  # anchor 0's loss alone
    assert positives.grad is None
    assert anchors.grad[0].abs().sum() > 0 and anchors.grad[1:].abs().sum() == 0  # negatives are detached

    anchors, positives = _views(2, batch=5, dim=4, seed=4)
    scores = group_scores(anchors, [positives], topk_negatives=3, stop_gradient=False)
    group_ordering_loss(scores[:1], 3).backward()
    assert positives.grad[0].abs().sum() > 0 and positives.grad[1:].abs().sum() == 0
    assert anchors.grad[1:].abs().sum() > 0  # through the hardest negatives


# ------------------------------------------------------------------------------------------------ the module
class _TinyEncoder(nn.Module):
    num_features = 6

    def __init__(self):
        super().__init__()
        self.layer = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, self.num_features))

    def forward(self, x):
        return self.layer(x)


def test_module_anchors_every_view_and_uses_only_full_size_views_as_positives():
    torch.manual_seed(0)
    model = GroCo(_TinyEncoder(), topk_negatives=3, num_views=2, num_local_views=2, projector_out_dim=5)
    assert model.view_names == ("view1", "view2", "local_0", "local_1")
    batch = {name: torch.randn(6, 3, 4, 4) for name in model.view_names} | {"label": torch.zeros(6, dtype=torch.long)}
    loss, features, logs = model.ssl_step(batch)
    assert len(features) == 2 and set(logs) == {"positive_min_similarity", "negative_max_similarity",
                                                "ordered_fraction"}
    torch.manual_seed(0)  # same weights: the loss is the official multi-crop combination of the embeddings
    again = GroCo(_TinyEncoder(), topk_negatives=3, num_views=2, num_local_views=2, projector_out_dim=5)
    embeddings = [again.embedding(again.network(batch[name])) for name in again.view_names]
    assert loss.item() == pytest.approx(_groco_over_views(embeddings, num_positive_views=2).item(), rel=1e-6)


def test_projector_is_the_official_three_layer_head():
    model = GroCo(_TinyEncoder(), projector_out_dim=2048)
    linears = [m for m in model.projector.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(6, 6), (6, 6), (6, 2048)]
    assert linears[-1].bias is not None and not linears[-1].bias.requires_grad  # cancelled by the BN, frozen
    last = model.projector[-1]
    assert isinstance(last, nn.BatchNorm1d) and not last.affine


def test_a_batch_smaller_than_topk_uses_every_other_image_with_a_warning():
    model = GroCo(_TinyEncoder(), topk_negatives=10)
    with pytest.warns(UserWarning, match="fewer than topk_negatives=10"):
        assert model.negatives_per_anchor(4) == 3
    assert model.negatives_per_anchor(64) == 10


# ----------------------------------------------------------------------------------------- two processes (gloo)
def _gather_worker(rank: int, port: int, views, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    n = views[0].shape[0] // 2
    local = [v[rank * n:(rank + 1) * n].detach().clone().requires_grad_() for v in views]
    loss = _groco_over_views(local, topk=3)
    loss.backward()
    out[rank] = {"loss": loss.item(), "grads": [v.grad.clone() for v in local]}
    dist.destroy_process_group()


def test_negatives_come_from_the_global_batch_over_two_processes():
    """Each rank ranks its anchors against both ranks' images: the mean of the ranks' losses is the single-process
    loss over the global batch, and DDP's average of their gradients is its gradient."""
    views = [v.detach() for v in _views(2, batch=8, dim=5, seed=5)]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_gather_worker, args=(port, views, out), nprocs=2, join=True)
    global_views = [v.clone().requires_grad_() for v in views]
    global_loss = _groco_over_views(global_views, topk=3)
    global_loss.backward()
    assert (out[0]["loss"] + out[1]["loss"]) / 2 == pytest.approx(global_loss.item(), rel=1e-5)
    for rank in range(2):
        for local_grad, view in zip(out[rank]["grads"], global_views):
            torch.testing.assert_close(local_grad / 2, view.grad[rank * 4:(rank + 1) * 4], rtol=1e-4, atol=1e-8)
