"""Model averaging (local SGD): workers train alone for ``k`` steps, then average their weights.

Synchronous SGD all-reduces gradients after every step; local SGD all-reduces the *parameters* once
every ``k`` optimizer steps, so communication drops by a factor of ``k`` at the price of workers
drifting apart between averages. Buffers (BatchNorm statistics) are averaged too; optimizer state
(momentum, Adam moments) stays local, as in Lin et al., "Don't use large mini-batches, use local SGD".

Plain ``torch.distributed``: the Ray Train worker loop has already set up the process group.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class ModelAverager:
    """Average ``model``'s parameters and floating-point buffers across the process group every ``k`` steps.

    Call ``after_step()`` after each optimizer step and ``average()`` at the end of each epoch, so that
    every worker evaluates (and checkpoints) the same weights. Every worker must make the same calls
    in the same order; equal-length samplers guarantee that.
    """

    def __init__(self, model: nn.Module, k: int):
        if k < 1:
            raise ValueError(f"train.local_steps: must be >= 1, got {k}")
        self.model, self.k = model, k
        self.steps = 0  # optimizer steps since the last average
        self.rounds = 0  # averages done: the communication rounds, one all-reduce each

    def _tensors(self) -> list[torch.Tensor]:
        floats = [b for b in self.model.buffers() if b.is_floating_point()]
        return [p.data for p in self.model.parameters()] + floats

    def average(self) -> None:
        """One all-reduce of all weights flattened into a single buffer (one message, not one per tensor).

        Raises:
            FloatingPointError: on every worker at once when any worker's weights became non-finite
                (the all-reduce spreads a NaN to all of them, so no worker waits alone in a collective).
        """
        self.steps = 0
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if world == 1:
            return
        tensors = self._tensors()
        flat = torch.cat([t.reshape(-1).float() for t in tensors])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= world
        self.rounds += 1
        if not torch.isfinite(flat).all():
            raise FloatingPointError(
                "weights became non-finite during model averaging; hint: lower train.lr or train.local_steps"
            )
        offset = 0
        for t in tensors:
            n = t.numel()
            t.copy_(flat[offset : offset + n].view_as(t))
            offset += n

    def after_step(self) -> None:
        self.steps += 1
        if self.steps >= self.k:
            self.average()
