"""Ranks agree by construction: every decision that ends or changes a data-parallel loop is taken once.

A data-parallel loop stays in step only while every rank makes the same calls in the same order. "Every
rank computes the same thing" is not enough: DDP keeps the *weights* equal, but each rank's forward
passes update its own BatchNorm running statistics (DDP broadcasts rank 0's buffers at the start of the
next forward, not after the last one), FSDP never synchronises buffers, and a gradient check on sharded
slices sees only one rank's part. A rank that decides alone to stop (early stopping, a NaN) leaves its
peers waiting forever in the next collective. So:

- ``sync_buffers`` gives every rank the same buffers before it evaluates (floating-point buffers
  averaged, the rest taken from rank 0), so all ranks evaluate one model;
- ``from_rank_zero`` hands rank 0's validation metrics to every rank, so the early-stopping state,
  the best checkpoint and the stop decision are computed from the same numbers everywhere;
- ``all_ranks_agree`` turns a per-rank check (finite gradients) into one verdict.

Plain ``torch.distributed``; without a process group (one worker, tests) each is the identity.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def world_size() -> int:
    """Ranks in the default process group; 1 without one."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_ranks_agree(ok: bool) -> bool:
    """True only if ``ok`` on every rank (one all-reduce of a flag; ``ok`` itself without a process group).

    A sharded check (gradients' finiteness) sees only this rank's slices; all ranks must still take the
    same decision, since a rank that raised alone would leave its peers waiting in the next collective.
    """
    if world_size() == 1:
        return ok
    flag = torch.tensor([1.0 if ok else 0.0])
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def sync_buffers(model: nn.Module) -> None:
    """Make ``model``'s buffers equal on every rank: floating-point ones (BatchNorm's running mean and
    variance) averaged in one all-reduce, the others (``num_batches_tracked``) broadcast from rank 0.

    The average rather than rank 0's copy: each rank's running statistics saw a different shard of the
    epoch's last batches, and their mean is the better estimate of the whole data's (what model averaging
    does with them too). Under DDP, the next training forward broadcasts rank 0's buffers, now this mean.
    """
    if world_size() == 1:
        return
    buffers = list(model.buffers())
    floats = [b for b in buffers if b.is_floating_point()]
    if floats:
        flat = torch.cat([b.detach().reshape(-1).double() for b in floats])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= world_size()
        offset = 0
        for b in floats:
            b.data.copy_(flat[offset: offset + b.numel()].view_as(b))
            offset += b.numel()
    for b in buffers:
        if not b.is_floating_point():
            dist.broadcast(b.data, src=0)


def from_rank_zero(values: dict[str, float]) -> dict[str, float]:
    """Rank 0's ``values`` on every rank (one broadcast of a float64 vector; every rank passes the same keys).

    Decisions computed from the result (a new best, a stop) are then the same on every rank, whatever
    rounding or buffer differences each rank's own evaluation had.
    """
    if world_size() == 1:
        return dict(values)
    keys = sorted(values)
    vector = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    dist.broadcast(vector, src=0)
    return dict(zip(keys, vector.tolist(), strict=True))
