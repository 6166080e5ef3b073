"""logconf under 2-process data parallelism (gloo, CPU): the all-gathered threshold reproduces the one-device loss."""
from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from test_weak_to_strong import LOGITS, WEAK
from zoo.lm.heads import logconf_loss


def _gather(tensor: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def _worker(rank: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    shard = slice(rank, None, 2)  # interleaved shards, as a sampler striding over ranks gives
    out[rank] = (logconf_loss(LOGITS[shard], WEAK[shard], 1.0, 0.5, 0.1, gather=_gather).item(),
                 logconf_loss(LOGITS[shard], WEAK[shard], 1.0, 0.5, 0.1).item())
    dist.destroy_process_group()


def test_logconf_threshold_is_global_under_ddp():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(port, out), nprocs=2, join=True)
    one_device = logconf_loss(LOGITS, WEAK, 1.0, 0.5, 0.1).item()
    gathered = (out[0][0] + out[1][0]) / 2  # DDP averages the ranks' equal-sized shards
    local_only = (out[0][1] + out[1][1]) / 2
    assert abs(gathered - one_device) < 1e-6
    assert abs(local_only - one_device) > 1e-3  # per-shard thresholds would change the loss on these inputs
