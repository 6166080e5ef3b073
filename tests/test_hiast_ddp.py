"""HIAST's selector under 2-process gloo: each rank holds half of the global target batch, gathers the pixels, and
ends with the same thresholds and class values as one process updating on the whole batch (the official
generator pools each batch of 2 images). Kept apart from test_hiast.py so the spawned workers import little."""
from __future__ import annotations

import os
import socket

import torch
import torch.multiprocessing as mp

from zoo.hiast.rules import gather_pixels, ias_thresholds, select_pseudo_labels, update_class_values

BATCHES = [(torch.rand(4, 6, 8, generator=torch.Generator().manual_seed(s)) * 0.8 + 0.2,
            torch.randint(0, 5, (4, 6, 8), generator=torch.Generator().manual_seed(s + 10))) for s in range(3)]


def selector_steps(batches, gather=lambda *x: x):
    thresholds, values = torch.full((5,), 0.9, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)
    for confidence, labels in batches:
        confidence, labels = gather(confidence, labels)
        thresholds = ias_thresholds(thresholds, confidence, labels)
        values = update_class_values(values, confidence, select_pseudo_labels(confidence, labels, thresholds))
    return thresholds, values


def _ddp_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    shards = [(c[rank * 2:(rank + 1) * 2], l[rank * 2:(rank + 1) * 2]) for c, l in BATCHES]
    torch.save(selector_steps(shards, gather_pixels), f"{out_dir}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_selector_gathers_the_global_batch_over_two_gloo_processes(tmp_path):
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    thresholds, values = selector_steps(BATCHES)
    single_shard = selector_steps([(c[:2], l[:2]) for c, l in BATCHES])
    assert not torch.equal(single_shard[0], thresholds)  # the shards alone would disagree
    for r in range(2):
        ranked = torch.load(tmp_path / f"rank{r}.pt")
        torch.testing.assert_close(ranked[0], thresholds, rtol=0, atol=1e-12)
        torch.testing.assert_close(ranked[1], values, rtol=0, atol=1e-12)
