"""Ranks agree by construction, across two real processes (gloo on 127.0.0.1): after training on different
shards the BatchNorm buffers differ, ``sync_buffers`` makes them one model, ``from_rank_zero`` one set of
numbers, ``all_ranks_agree`` one verdict, and a training step's NaN check stops every rank together."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from optforge.tasks.techniques.training.agreement import all_ranks_agree, from_rank_zero, sync_buffers


def _worker(rank: int, port: int, results):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)  # the same weights on both ranks, as after DDP's broadcast
        model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
        model.train()
        shard = torch.randn(32, 4) * (1 + 3 * rank) + rank  # each rank's own data: a different scale
        model(shard)  # the forward updates this rank's running statistics only
        before = model[1].running_mean.clone()
        other = [torch.zeros_like(before) for _ in range(2)]
        dist.all_gather(other, before)
        sync_buffers(model)
        after = [torch.zeros_like(before) for _ in range(2)]
        dist.all_gather(after, model[1].running_mean)
        model.eval()
        probe = torch.ones(3, 4)
        logits = model(probe).detach()
        decided = from_rank_zero({"loss": 0.25 + rank, "accuracy": 90.0 - rank})
        results[rank] = {
            "differed": not torch.equal(other[0], other[1]),
            "mean_expected": torch.allclose(model[1].running_mean, (other[0] + other[1]) / 2, atol=1e-6),
            "equal_after": torch.equal(after[0], after[1]),
            "tracked": int(model[1].num_batches_tracked),
            "logits": logits.tolist(),
            "decided": decided,
            "agree_all_ok": all_ranks_agree(True),
            "agree_one_bad": all_ranks_agree(rank == 0),
        }
    finally:
        dist.destroy_process_group()


def _nan_worker(rank: int, port: int, results):
    """One training step in which only rank 1's batch is poisoned, with no DDP all-reduce to spread it: the
    NaN check still stops both ranks at the same step (``all_ranks_agree`` inside ``train_epoch``)."""
    from optforge.tasks.techniques.training.training import Precision, train_epoch

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        model = nn.Linear(4, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        x = torch.ones(4, 4) * (float("nan") if rank == 1 else 1.0)
        batches = [({"input": x}, torch.zeros(4, dtype=torch.long))]
        try:
            train_epoch(model, batches, opt, sched, Precision("cpu", None, None), 1)
            results[rank] = "trained on"
        except FloatingPointError as exc:
            results[rank] = str(exc)
    finally:
        dist.destroy_process_group()


def _run(worker) -> dict:
    from tests.conftest import free_port  # here, not at the top: the spawned workers import this module

    results = mp.Manager().dict()
    mp.spawn(worker, args=(free_port(), results), nprocs=2, join=True)
    return dict(results)


def test_ranks_evaluate_one_model_and_take_rank_zeros_numbers():
    results = _run(_worker)
    for rank in (0, 1):
        r = results[rank]
        assert r["differed"]  # the ranks' statistics really were different before
        assert r["mean_expected"] and r["equal_after"]
        assert r["tracked"] == 1
        assert r["decided"] == {"loss": pytest.approx(0.25), "accuracy": pytest.approx(90.0)}
        assert r["agree_all_ok"] is True and r["agree_one_bad"] is False
    assert results[0]["logits"] == results[1]["logits"]  # one model: bit-for-bit the same outputs


def test_a_nan_on_one_rank_stops_both_at_the_same_step():
    results = _run(_nan_worker)
    assert all("non-finite" in results[rank] for rank in (0, 1)), results


def test_without_a_process_group_each_is_the_identity():
    model = nn.BatchNorm1d(3)
    model.running_mean.fill_(2.0)
    sync_buffers(model)
    assert model.running_mean.tolist() == [2.0, 2.0, 2.0]
    assert from_rank_zero({"a": 1.5}) == {"a": 1.5}
    assert all_ranks_agree(False) is False and all_ranks_agree(True) is True
