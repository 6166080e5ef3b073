"""The zoo's collectives (``zoo.core.distributed``) under 2-process gloo on CPU, and their one-process identities.

They replace the per-paper copies: Consistent-Teacher's loss normaliser (mmdet's ``reduce_mean``), CREAM's ``avg``
consistency over a round's prompts (unequal shares per process), ShrinkMatch's certain ratio, SimMatchV2's and
HIAST's gathers."""
from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from zoo.core.distributed import concat_all_gather, global_mean, mean_over_ranks, rank_and_world

# per-process shares with unequal counts (a round's prompts need not divide evenly over processes)
SHARES = [torch.tensor([0.2, 0.4, 0.9]), torch.tensor([1.0, 0.5])]


def _worker(rank: int, port: int, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    out[rank] = {"rank_and_world": rank_and_world(),
                 "mean": float(mean_over_ranks(torch.tensor(3.0 * (rank + 1)))),
                 "global_mean": float(global_mean(SHARES[rank])),
                 "gathered": concat_all_gather(torch.tensor([[rank, 10 + rank]])).tolist()}
    dist.destroy_process_group()


def test_collectives_over_two_processes():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(port, out), nprocs=2, join=True)
    assert [out[r]["rank_and_world"] for r in range(2)] == [(0, 2), (1, 2)]
    assert [out[r]["mean"] for r in range(2)] == [4.5, 4.5]  # every process divides by the same normaliser
    expected = torch.cat(SHARES).mean().item()  # the mean over all values, not the mean of the two means
    assert all(abs(out[r]["global_mean"] - expected) < 1e-6 for r in range(2))
    assert out[0]["gathered"] == out[1]["gathered"] == [[0, 10], [1, 11]]  # rank order


def test_collectives_are_identities_on_one_process():
    x = torch.tensor([1.0, 2.0])
    assert rank_and_world() == (0, 1)
    assert mean_over_ranks(x) is x and concat_all_gather(x) is x
    assert abs(global_mean(SHARES[0]).item() - SHARES[0].mean().item()) < 1e-6
