"""torch.distributed helpers shared by every method (pure torch; Ray sets up the process group).

``all_gather_with_grad`` is the autograd-aware all-gather: the forward concatenates every rank's
rows (ranks may hold different numbers of rows), the backward hands each rank the gradient of
its own rows summed over all ranks (every rank used the gathered tensor in its own loss).
Without an initialised process group (or with one rank) it is the identity, so the same code
runs single-process with the same numbers.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def _row_counts(t: torch.Tensor) -> list[int]:
    n = torch.tensor([t.shape[0]], dtype=torch.long, device=t.device)
    counts = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, n)
    return [int(c.item()) for c in counts]


def _gather_rows(t: torch.Tensor, counts: list[int]) -> torch.Tensor:
    # all_gather needs equal shapes: pad to the largest count, then trim
    most = max(counts)
    padded = t.new_zeros((most,) + tuple(t.shape[1:]))
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:c] for p, c in zip(parts, counts)])


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        counts = _row_counts(t)
        ctx.counts = counts
        ctx.rank = dist.get_rank()
        return _gather_rows(t.detach(), counts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        # every rank's loss depends on every row: sum the gradients over ranks, keep our rows
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.counts[: ctx.rank])
        return grad[start: start + ctx.counts[ctx.rank]]


def all_gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t`` (rows along dim 0) from every rank, in rank order, keeping gradients."""
    if not is_distributed():
        return t
    return _AllGatherWithGrad.apply(t)


def all_gather_no_grad(t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t`` from every rank along dim 0 (no autograd), e.g. labels or indices."""
    if not is_distributed():
        return t
    return _gather_rows(t.detach(), _row_counts(t))


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over ranks (a new tensor; no autograd)."""
    if not is_distributed():
        return t.detach().clone()
    out = t.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def barrier() -> None:
    """Wait for every rank (no-op single-process)."""
    if is_distributed():
        dist.barrier()
