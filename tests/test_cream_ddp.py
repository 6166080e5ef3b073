"""CREAM's ``avg`` consistency is a mean over all prompts of a round, across processes (2-process gloo)."""
from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from zoo.lm.preference import global_mean

# per-process shares of a round with unequal counts (a round's prompts need not divide evenly)
SHARES = [torch.tensor([0.2, 0.4, 0.9]), torch.tensor([1.0, 0.5])]


def _worker(rank: int, port: int, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    out[rank] = global_mean(SHARES[rank]).item()
    dist.destroy_process_group()


def test_avg_consistency_is_the_mean_over_all_processes():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(port, out), nprocs=2, join=True)
    expected = torch.cat(SHARES).mean().item()
    assert out[0] == out[1] and abs(out[0] - expected) < 1e-6
    assert abs(global_mean(SHARES[0]).item() - SHARES[0].mean().item()) < 1e-6  # one process: the plain mean
