"""Epoch orders for fine-tuning on old plus new data: ``uniform`` and ``tail`` mixing.

Samples ``0 .. n_old-1`` are the data a model was trained on, ``n_old .. n_old+n_new-1`` the new
data. ``uniform`` shuffles them together, so new samples are spread through the whole epoch.
``tail`` keeps the first ``1 - tail_fraction`` of the epoch old-only and shuffles every new sample
into the last ``tail_fraction``: when the new set is small, the model sees it late in each epoch,
after the old data has re-anchored it, instead of a few new samples being diluted everywhere.

With several workers each rank gets its own share of old and new samples and builds its own order,
so the property holds per worker (the sampler test asserts it on every rank).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler


def _share(indices: np.ndarray, rank: int, num_replicas: int, length: int) -> np.ndarray:
    """This rank's strided share of ``indices``, wrapped round to ``length`` so every rank steps equally."""
    mine = indices[rank::num_replicas]
    if len(mine) >= length or len(indices) == 0:
        return mine[:length]
    return np.resize(mine if len(mine) else indices, length)


def epoch_order(
    n_old: int, n_new: int, mode: str, tail_fraction: float, epoch: int, seed: int,
    num_replicas: int = 1, rank: int = 0,
) -> np.ndarray:
    """Indices (into old followed by new) that ``rank`` visits in ``epoch``; the same length on every rank.

    Raises:
        ValueError: ``mode='tail'`` when the new samples do not fit in the tail (names ``train.tail_fraction``).
    """
    if mode not in ("uniform", "tail"):
        raise ValueError(f"train.mix: expected 'uniform' or 'tail', got {mode!r}")
    rng = np.random.default_rng([seed, epoch])
    old = rng.permutation(n_old)
    new = n_old + rng.permutation(n_new)
    # Per-rank counts: ceil so no sample is dropped; short ranks repeat a few of their own samples.
    per_old, per_new = -(-n_old // num_replicas), -(-n_new // num_replicas)
    my_old, my_new = _share(old, rank, num_replicas, per_old), _share(new, rank, num_replicas, per_new)
    if mode == "uniform" or n_new == 0:
        return rng.permutation(np.concatenate([my_old, my_new])).astype(np.int64)
    length = per_old + per_new
    tail_len = int(np.floor(tail_fraction * length))
    if per_new > tail_len:
        need = per_new / length
        raise ValueError(
            f"train.tail_fraction: {tail_fraction} of an epoch holds {tail_len} samples per worker, but "
            f"{per_new} new samples must fit in it; use at least {need:.3f}, or mix: uniform"
        )
    head_old = length - tail_len  # old samples before the tail; the rest of the old ones share the tail
    tail = rng.permutation(np.concatenate([my_old[head_old:], my_new]))
    return np.concatenate([my_old[:head_old], tail]).astype(np.int64)


class MixingSampler(Sampler[int]):
    """A ``DistributedSampler`` stand-in that orders each epoch with ``epoch_order``; call ``set_epoch``."""

    def __init__(self, n_old: int, n_new: int, mode: str = "uniform", tail_fraction: float = 0.25,
                 num_replicas: int = 1, rank: int = 0, seed: int = 0):
        self.n_old, self.n_new, self.mode, self.tail_fraction = n_old, n_new, mode, tail_fraction
        self.num_replicas, self.rank, self.seed, self.epoch = num_replicas, rank, seed, 0
        epoch_order(n_old, n_new, mode, tail_fraction, 0, seed, num_replicas, rank)  # fail at construction

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        order = epoch_order(self.n_old, self.n_new, self.mode, self.tail_fraction, self.epoch, self.seed,
                            self.num_replicas, self.rank)
        return iter(order.tolist())

    def __len__(self) -> int:
        return -(-self.n_old // self.num_replicas) + -(-self.n_new // self.num_replicas)
