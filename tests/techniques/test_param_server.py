"""The asgd parameter server without Ray: staleness bound, versions, work handout, epochs, NaN, checkpoints."""

import numpy as np
import pytest
import torch
from torch import nn

from optforge.tasks.techniques.training.param_server import ParameterServer, Push
from optforge.tasks.techniques.training.training import TrainConfig, evaluate
from tests.techniques.helpers import table_part


def toy(n=96, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 4)).astype(np.float32)
    return X, (X[:, 0] > 0).astype(np.int64)


def make(n_old=96, n_new=0, records=None, **overrides):
    cfg = TrainConfig(**{"strategy": "asgd", "epochs": 3, "batch_size": 16, "lr": 0.2, "optimizer": "sgd",
                         "patience": 0, "staleness_bound": 1, **overrides})
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    X, y = toy(n_old + n_new)
    hook = records.append if records is not None else None
    val = table_part(X, y)
    return ParameterServer(model, cfg, n_old, n_new, lambda m: evaluate(m, val), num_workers=2, on_epoch_end=hook)


def gradient(server, reply, X, y) -> Push:
    """What a worker does: gradient of the reply's weights on the reply's batches."""
    model = nn.Linear(4, 2)
    model.load_state_dict(reply.weights)
    idx = np.concatenate(reply.work.batches)
    loss = nn.functional.cross_entropy(model(torch.as_tensor(X[idx])), torch.as_tensor(y[idx]))
    loss.backward()
    return Push(reply.version, {k: p.grad for k, p in model.named_parameters()}, loss_sum=loss.item() * len(idx),
                seen=len(idx))


def test_fresh_gradient_applies_and_stale_one_is_dropped():
    server = make(staleness_bound=1)
    X, y = toy()
    old = server.next(0)  # worker 0 holds version 0
    for _ in range(2):  # worker 1 pushes twice: the server moves to version 2
        r = server.next(1)
        assert server.receive(1, gradient(server, r, X, y))
    assert server.version == 2
    before = server.weights()
    server.next(0, gradient(server, old, X, y))  # staleness 2 > bound 1: dropped
    assert server.version == 2
    torch.testing.assert_close(server.weights(), before)
    totals = server.totals()
    assert totals["stale_dropped"] == 1 and totals["staleness_max"] == 2
    assert totals["staleness_mean"] == pytest.approx(2 / 3)  # 0, 0, 2
    assert totals["updates_worker_1"] == 2 and totals["updates_worker_0"] == 0 and totals["units_worker_0"] == 1


def test_handout_covers_every_sample_once_per_epoch_then_stops():
    records = []
    server = make(n_old=90, n_new=10, records=records, grad_accum_steps=2, mix="tail", tail_fraction=0.5)
    X, y = toy(100)
    seen: dict[int, list[int]] = {}
    replies = {0: server.next(0), 1: server.next(1)}
    while any(r.work is not None for r in replies.values()):
        for w, r in replies.items():
            if r.work is None:
                continue
            assert len(r.work.batches) <= 2 and all(len(b) <= 16 for b in r.work.batches)
            seen.setdefault(r.work.epoch, []).extend(np.concatenate(r.work.batches).tolist())
            replies[w] = server.next(w, gradient(server, r, X, y))
    assert sorted(seen) == [0, 1, 2]
    for order in seen.values():
        assert sorted(order) == list(range(100))
        assert set(order[:50]) < set(range(90))  # mix=tail: new samples only in the last half
    assert [r["epoch"] for r in records] == [0, 1, 2] and server.done
    # 2 workers in lockstep: nothing stale; the unit still in flight when training ended is ignored.
    assert server.totals()["stale_dropped"] == 0 and server.version == 3 * server.units_per_epoch - 1
    assert {"train_loss", "val_accuracy", "lr", "staleness_mean", "workers_alive"} <= set(records[-1])
    assert records[-1]["val_accuracy"] > 80


def test_lost_worker_work_is_requeued():
    server = make()
    held = server.next(0).work
    server.worker_lost(0)
    assert server.next(0).work is None  # a worker declared lost gets no more work
    again = server.next(1).work
    assert np.array_equal(np.concatenate(again.batches), np.concatenate(held.batches))
    assert server.totals()["workers_lost"] == 1


def test_nan_gradient_raises_with_hint_and_stops_everyone():
    server = make()
    r = server.next(0)
    bad = Push(r.version, {k: torch.full_like(v, float("nan")) for k, v in server.params.items()})
    with pytest.raises(FloatingPointError, match="hint: lower train.lr"):
        server.next(0, bad)
    assert server.nonfinite and server.next(1).work is None


def test_state_round_trip_resumes_after_the_epoch(tmp_path):
    records = []
    server = make(records=records, patience=5)
    X, y = toy()
    r = server.next(0)
    while not records:
        r = server.next(0, gradient(server, r, X, y))
    path = tmp_path / "state.pt"
    torch.save(server.state_dict(), path)
    state = torch.load(path, weights_only=True)  # plain tensors and numbers only
    assert state["epoch"] == 0 and not state["done"] and state["early_stopping"]["best_epoch"] == 0

    resumed = make(epochs=5)
    resumed.load_state_dict(state)
    assert resumed.version == server.version and resumed.epoch == 1 and not resumed.done
    torch.testing.assert_close(resumed.weights(), state["model"])
    assert resumed.next(0).work.epoch == 1
    finished = make(epochs=1)
    finished.load_state_dict(state)
    assert finished.done and finished.next(0).work is None


def test_bad_tail_fraction_fails_at_construction():
    with pytest.raises(ValueError, match="train.tail_fraction"):
        make(n_old=10, n_new=90, mix="tail", tail_fraction=0.1)
