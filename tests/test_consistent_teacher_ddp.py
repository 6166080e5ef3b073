"""Consistent-Teacher under 2-process DDP (gloo, CPU): the loss normaliser is averaged over processes.

Kept apart from test_consistent_teacher.py so that the spawned processes import only torch and the losses module.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path

import torch

from zoo.consistent_teacher.losses import _mean_over_processes


def _normaliser_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    mean = _mean_over_processes(torch.tensor(3.0 * (rank + 1)))
    (Path(out_dir) / f"{rank}.txt").write_text(str(float(mean)))
    torch.distributed.destroy_process_group()


def test_loss_normaliser_is_averaged_over_two_processes(tmp_path):
    """mmdet's reduce_mean of the positives' weight: every process divides by the same (mean) normaliser."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_normaliser_worker, args=(2, port, str(tmp_path)), nprocs=2)
    assert [float((tmp_path / f"{r}.txt").read_text()) for r in range(2)] == [4.5, 4.5]
