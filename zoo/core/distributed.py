"""Collectives every method uses, each a no-op outside a distributed run (one process, or world size 1)."""
from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["is_distributed", "rank_and_world", "concat_all_gather", "mean_over_ranks", "global_mean"]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def concat_all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's ``tensor`` (same shape on every rank) concatenated along dim 0 in rank order. No gradient."""
    if not is_distributed():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


@torch.no_grad()
def mean_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """Element-wise mean over processes of a tensor every rank holds (a statistic of an equal share of the global
    batch, so this is the statistic of the global batch). No gradient."""
    if not is_distributed():
        return tensor
    total = tensor.detach().clone()
    dist.all_reduce(total)
    return total / dist.get_world_size()


def global_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean over every process's ``values`` when processes hold different counts (sum and count reduced in
    float64, so the result does not depend on the split)."""
    totals = torch.stack([values.detach().sum().double(), torch.tensor(float(values.numel()), dtype=torch.float64,
                                                                       device=values.device)])
    if is_distributed():
        dist.all_reduce(totals)
    return (totals[0] / totals[1]).to(values.dtype)
