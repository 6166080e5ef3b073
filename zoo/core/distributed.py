"""Collectives every method uses, each a no-op outside a distributed run (one process, or world size 1)."""
from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["is_distributed", "rank_and_world", "concat_all_gather", "gather_with_grad", "mean_over_ranks",
           "global_mean"]


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


class _GatherWithGrad(torch.autograd.Function):
    """Forward: ``concat_all_gather``. Backward: each rank's gradient with respect to the gathered tensor is summed
    over ranks (``all_reduce``) and each rank keeps the rows it contributed: the gradient that every rank's loss
    sends to this rank's embeddings (what SimCLR's ``tpu_cross_replica_concat``, a cross-replica sum, does)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        ctx.rows = tensor.shape[0]
        return concat_all_gather(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        rank = dist.get_rank()
        return grad[rank * ctx.rows : (rank + 1) * ctx.rows]


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's ``tensor`` (same shape on every rank) concatenated along dim 0 in rank order, differentiable.

    With each rank's loss the mean over its own anchors and DDP averaging the parameter gradients, the gradient
    equals the one of the single-process loss over the global batch (``tests/test_ssl.py`` checks it under gloo).
    Identity outside a distributed run."""
    if not is_distributed():
        return tensor
    return _GatherWithGrad.apply(tensor)


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
