"""Model averaging across two real processes (gloo on 127.0.0.1): weights become the mean; NaN stops both."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from optforge.tasks.techniques.training.averaging import ModelAverager


def _worker(rank: int, port: int, results, poison: bool):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float(rank + 1))  # rank 0 holds 1s, rank 1 holds 2s
            model[1].running_mean.fill_(10.0 * rank)
            if poison and rank == 1:
                model[0].weight[0, 0] = float("nan")
        averager = ModelAverager(model, k=2)
        averager.after_step()  # 1 of 2 local steps: nothing yet
        untouched = float(model[0].bias[0])
        try:
            averager.after_step()  # 2 of 2: average
            results[rank] = (untouched, float(model[0].bias[0]), float(model[1].running_mean[0]), averager.rounds)
        except FloatingPointError as exc:
            results[rank] = str(exc)
    finally:
        dist.destroy_process_group()


def _run(poison: bool) -> dict:
    from tests.conftest import free_port  # here, not at the top: the spawned workers import this module

    results = mp.Manager().dict()
    mp.spawn(_worker, args=(free_port(), results, poison), nprocs=2, join=True)
    return dict(results)


def test_every_k_steps_weights_and_buffers_become_the_mean():
    results = _run(poison=False)
    for rank in (0, 1):
        untouched, bias, running_mean, rounds = results[rank]
        assert untouched == rank + 1  # no communication before the k-th step
        assert bias == pytest.approx(1.5) and running_mean == pytest.approx(5.0) and rounds == 1


def test_a_nan_on_one_worker_stops_both_at_the_same_average():
    results = _run(poison=True)
    assert all("non-finite" in results[rank] and "train.local_steps" in results[rank] for rank in (0, 1))


def test_local_steps_below_one_is_refused():
    with pytest.raises(ValueError, match="train.local_steps"):
        ModelAverager(nn.Linear(2, 2), k=0)
