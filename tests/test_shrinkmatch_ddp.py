"""ShrinkMatch's distribution alignment under 2-process gloo: each rank aligns its shard with the FIFO of *global*
batch means, exactly as one process aligning the whole global batch (the official code all-reduces the batch mean;
here it is all-gathered). Kept apart from test_shrinkmatch.py so the spawned workers import little."""
from __future__ import annotations

import os
import socket

import torch
import torch.multiprocessing as mp

from zoo.core.distributed import mean_over_ranks
from zoo.shrinkmatch.module import distribution_alignment


def close(actual, expected):
    torch.testing.assert_close(torch.as_tensor(actual), torch.as_tensor(expected), rtol=1e-5, atol=1e-7)


LOGITS_DDP = [torch.randn(8, 10, generator=torch.Generator().manual_seed(s)) * 3 for s in (1, 2, 3)]


def _ddp_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    queue, pointer = torch.zeros(4, 10), torch.zeros((), dtype=torch.long)
    aligned = [distribution_alignment(torch.softmax(logits[rank::world_size], 1), queue, pointer)
               for logits in LOGITS_DDP]  # 3 steps: the queue of 4 is filled partly, the pointer moves
    ratio = mean_over_ranks(torch.tensor(float(rank)))
    torch.save({"aligned": aligned, "queue": queue, "pointer": pointer, "ratio": ratio}, f"{out_dir}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_distribution_alignment_gathers_over_two_gloo_processes(tmp_path):
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    queue, pointer = torch.zeros(4, 10), torch.zeros((), dtype=torch.long)
    for step, logits in enumerate(LOGITS_DDP):  # one process on the whole global batch
        aligned = distribution_alignment(torch.softmax(logits, 1), queue, pointer)
        for r in range(2):
            close(ranks[r]["aligned"][step], aligned[r::2])
    for r in range(2):
        close(ranks[r]["queue"], queue)
        assert int(ranks[r]["pointer"]) == 3
        close(ranks[r]["ratio"], 0.5)
