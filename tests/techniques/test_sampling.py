"""Epoch orders for old + new data (train.mix): what each worker visits, and where the new samples go."""

import numpy as np
import pytest

from optforge.tasks.techniques.data.sampling import MixingSampler, epoch_order

N_OLD, N_NEW = 200, 30


@pytest.mark.parametrize("world", [1, 2, 3])
def test_tail_puts_new_samples_only_in_the_last_fraction_on_every_rank(world):
    fraction = 0.3
    seen = []
    for rank in range(world):
        sampler = MixingSampler(N_OLD, N_NEW, "tail", fraction, world, rank, seed=7)
        for epoch in range(3):
            sampler.set_epoch(epoch)
            order = np.array(list(sampler))
            new_positions = np.nonzero(order >= N_OLD)[0]
            assert len(order) == len(sampler)
            # Every new sample of this rank sits in the tail; the head is old data only.
            assert new_positions.min() >= int(len(order) - np.floor(fraction * len(order)))
            assert len(new_positions) == -(-N_NEW // world)
            seen.append(order)
    # Together the ranks still cover every sample of an epoch (the last one, epoch 2, per rank).
    assert set(np.concatenate(seen[2::3] if world > 1 else seen[2:])) >= set(range(N_OLD + N_NEW))


def test_uniform_spreads_new_samples_through_the_epoch():
    order = epoch_order(N_OLD, N_NEW, "uniform", 0.3, epoch=0, seed=0)
    positions = np.nonzero(order >= N_OLD)[0]
    assert sorted(order.tolist()) == list(range(N_OLD + N_NEW))
    assert positions.min() < len(order) * 0.3  # some new samples early: not a tail
    assert positions.max() > len(order) * 0.7


def test_orders_change_per_epoch_and_repeat_per_seed():
    a0, a1 = epoch_order(N_OLD, N_NEW, "tail", 0.3, 0, 1), epoch_order(N_OLD, N_NEW, "tail", 0.3, 1, 1)
    assert not np.array_equal(a0, a1)
    assert np.array_equal(a0, epoch_order(N_OLD, N_NEW, "tail", 0.3, 0, 1))


def test_ranks_get_equal_lengths_when_counts_do_not_divide():
    lengths = {len(epoch_order(101, 7, "tail", 0.5, 0, 0, num_replicas=3, rank=r)) for r in range(3)}
    assert lengths == {-(-101 // 3) + -(-7 // 3)}


def test_tail_too_small_for_the_new_data_names_the_field():
    with pytest.raises(ValueError, match="train.tail_fraction: 0.05 .* use at least 0.13"):
        MixingSampler(N_OLD, N_NEW, "tail", 0.05)


def test_no_new_data_is_a_plain_shuffle():
    order = epoch_order(50, 0, "tail", 0.1, 0, 0)
    assert sorted(order.tolist()) == list(range(50))
