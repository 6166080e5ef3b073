"""The ssl family's cross-rank state under 2-process gloo.

- InterCLR: every rank's queue, memory bank, online cluster labels and centroids stay identical, and hold the
  *global* batch's keys in rank order (each rank writes the gathered keys, not only its own shard's; without the
  gather the banks of the two ranks would diverge after one step).
- BSS: every rank standardises its shard with the same style image, the one the global draw names (owner rank and
  index on the owner), broadcast from its owner; so the global batch shares one style, as on one device.
Kept apart from test_interclr.py / test_bss.py so the spawned workers import little.
"""
from __future__ import annotations

import os
import socket

import torch
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from zoo.bss.module import BatchStylesStandardization, low_frequency_mask, standardize_styles
from zoo.interclr.module import InterCLR, cluster_means

LOCAL = 2  # images per rank; the global batch is 2 x LOCAL


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(worker, tmp_path) -> list[dict]:
    mp.spawn(worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]


def _init(rank: int, world_size: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)


# ----------------------------------------------------------------------------------------------- InterCLR
class _TinyEncoder(nn.Module):
    num_features = 16

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 16), nn.ReLU())

    def forward(self, x):
        return self.body(x)


def _interclr() -> InterCLR:
    torch.manual_seed(0)
    model = InterCLR(_TinyEncoder(), queue_length=10, feature_dim=8, num_clusters=3, min_cluster_size=2,
                     num_negatives=4, semihard_pool=6, centroid_update_interval=1)
    bank, labels = F.normalize(torch.randn(12, 8), dim=1), torch.arange(12) % 3
    model.bank, model.bank_labels = bank, labels
    model.centroids.copy_(cluster_means(bank, labels, model.centroids))
    return model


def _global_batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [{"view1": torch.randn(2 * LOCAL, 3, 4, 4, generator=g), "view2": torch.randn(2 * LOCAL, 3, 4, 4, generator=g),
             "idx": idx, "label": torch.zeros(2 * LOCAL, dtype=torch.long)}
            for idx in (torch.tensor([1, 5, 7, 11]), torch.tensor([0, 5, 8, 9]))]


def _interclr_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    _init(rank, world_size, port)
    model = _interclr()
    keys = []
    for batch in _global_batches():
        shard = {name: value[rank * LOCAL:(rank + 1) * LOCAL] for name, value in batch.items()}
        with torch.no_grad():
            keys.append(F.normalize(model.key_encoder(shard["view2"]), dim=1))
        model.ssl_step(shard)
    torch.save({"keys": keys, **{name: getattr(model, name).clone() for name in
                                 ("queue", "queue_pointer", "bank", "bank_labels", "centroids")}},
               f"{out_dir}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_interclr_queue_and_bank_hold_the_global_batch_on_every_rank(tmp_path):
    ranks = _spawn(_interclr_worker, tmp_path)
    for name in ("queue", "queue_pointer", "bank", "bank_labels", "centroids"):
        torch.testing.assert_close(ranks[0][name], ranks[1][name], rtol=0, atol=0, msg=f"{name} differs across ranks")
    first, second = ranks[0], ranks[1]
    assert int(first["queue_pointer"]) == 4 * LOCAL  # two steps of the global batch
    for step, batch in enumerate(_global_batches()):
        global_keys = torch.cat([first["keys"][step], second["keys"][step]])  # rank order, as all_gather
        slots = slice(step * 2 * LOCAL, (step + 1) * 2 * LOCAL)
        torch.testing.assert_close(first["queue"][slots], global_keys)
    last = _global_batches()[-1]["idx"]
    torch.testing.assert_close(first["bank"][last], torch.cat([first["keys"][-1], second["keys"][-1]]))


# ------------------------------------------------------------------------------------------------------ BSS
class _StandardizeOnly(BatchStylesStandardization):
    """BSS's step alone: no host, views already in [0, 1] (mean 0, std 255 undoes the 0..255 normalisation)."""

    view_names = ("view1", "view2")
    global_step = 7

    def __init__(self):
        self.configure_bss(bss_p=1.0, area_ratio=(0.05, 0.3))
        self.pixel_mean, self.pixel_std = torch.zeros(1, 3, 1, 1), torch.full((1, 3, 1, 1), 255.0)


def _bss_views() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {name: torch.rand(2 * LOCAL, 3, 8, 8, generator=g) for name in ("view1", "view2")}


def _bss_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    _init(rank, world_size, port)
    torch.manual_seed(0)  # the draw is a function of (initial seed, step, view): the same on every rank
    shard = {name: views[rank * LOCAL:(rank + 1) * LOCAL] for name, views in _bss_views().items()}
    standardized, _ = _StandardizeOnly().standardize_views(shard)
    torch.save({name: standardized[name].contiguous() for name in shard}, f"{out_dir}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_bss_every_rank_takes_the_style_of_the_globally_drawn_image(tmp_path):
    ranks = _spawn(_bss_worker, tmp_path)
    torch.manual_seed(0)
    module = _StandardizeOnly()
    for view_index, (name, views) in enumerate(_bss_views().items()):
        apply, r, owner, index = module.style_draw(view_index, world=2, local_batch=LOCAL)
        assert apply
        style = views[owner * LOCAL + index]  # the owner's image, broadcast to the other rank
        mask = low_frequency_mask(8, 8, r)
        for rank in range(2):
            expected = standardize_styles(views[rank * LOCAL:(rank + 1) * LOCAL], style, mask)
            torch.testing.assert_close(ranks[rank][name], expected, rtol=1e-5, atol=1e-5)
    # the two views drew different styles or ratios: the test would not tell a per-view draw from a shared one
    draws = [module.style_draw(v, world=2, local_batch=LOCAL) for v in range(2)]
    assert draws[0] != draws[1]
