import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch import nn
from torch.utils.data import DataLoader

from optforge.tasks.techniques.training.training import (
    OPTIMIZERS,
    EarlyStopping,
    TrainConfig,
    all_finite,
    evaluate,
    make_optimizer,
    make_scheduler,
    precision_for,
    train_epoch,
)
from tests.techniques.helpers import TableRows, table_part


def toy(n=256, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 8)).astype(np.float32)
    y = (X[:, 0] + X[:, 1] > 0).astype(np.int64)
    return X, y


def fit(cfg: TrainConfig, epochs=15):
    torch.manual_seed(0)
    X, y = toy()
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))
    loader = DataLoader(TableRows(X, y), batch_size=cfg.batch_size, shuffle=True)  # yields ({"input": x}, y)
    opt = make_optimizer(model, cfg)
    sched = make_scheduler(opt, cfg, -(-len(loader) // cfg.grad_accum_steps))
    for _ in range(epochs):
        train_epoch(model, loader, opt, sched, precision_for(torch.device("cpu"), cfg.amp), cfg.grad_accum_steps)
    return evaluate(model, table_part(X, y))["accuracy"]


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_optimizer_learns(name):
    lr = {"sgd": 0.1, "adamw": 1e-2, "lamb": 1e-2, "lars": 0.5}[name]
    assert fit(TrainConfig(optimizer=name, lr=lr, batch_size=32, epochs=15)) > 90


def test_amp_bf16_and_accumulation_learn():
    assert fit(TrainConfig(amp=True, lr=1e-2, batch_size=16, grad_accum_steps=4, epochs=15)) > 90
    assert precision_for(torch.device("cpu"), True).dtype == torch.bfloat16


def test_accumulation_equals_big_batch():
    """4 micro-batches of 8 with accumulation give the same update as one batch of 32."""
    X, y = toy(32)
    data = [({"input": torch.as_tensor(X[i : i + 8])}, torch.as_tensor(y[i : i + 8])) for i in range(0, 32, 8)]
    results = []
    for batches, accum in ((data, 4), ([({"input": torch.as_tensor(X)}, torch.as_tensor(y))], 1)):
        torch.manual_seed(0)
        model = nn.Linear(8, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        train_epoch(model, batches, opt, sched, precision_for(torch.device("cpu"), False), accum)
        results.append(model.weight.detach().clone())
    torch.testing.assert_close(results[0], results[1])


def test_schedule_warmup_then_cosine_to_zero():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make_scheduler(opt, TrainConfig(epochs=10, warmup_epochs=1, lr=1.0), steps_per_epoch=10)
    lrs = []
    for _ in range(100):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1) and max(lrs) == pytest.approx(1.0) and lrs[-1] < 0.01


def test_nan_loss_stops_with_hint():
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    batch = [({"input": torch.tensor([[float("nan"), 1.0]])}, torch.tensor([0]))]
    with pytest.raises(FloatingPointError, match="non-finite .* at step 0; hint: lower train.lr"):
        train_epoch(model, batch, opt, sched, precision_for(torch.device("cpu"), False), 1)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_non_finite_value_among_millions_is_found(bad, dtype):
    tensors = [torch.randn(1000, 1000).to(dtype), torch.randn(10).to(dtype)]
    assert all_finite(tensors) and all_finite([])
    tensors[0][123, 456] = bad
    assert not all_finite(tensors)


def test_fused_optimizers_match_the_per_tensor_ones():
    """SGD and AdamW are built fused; the weights they reach are those of the plain implementation."""
    torch.manual_seed(0)
    X, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    for name, plain in (("adamw", lambda p, c: torch.optim.AdamW(p, lr=c.lr, weight_decay=c.weight_decay)),
                        ("sgd", lambda p, c: torch.optim.SGD(p, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay))):
        cfg = TrainConfig(optimizer=name, lr=0.05)
        a, b = nn.Linear(8, 3), nn.Linear(8, 3)
        b.load_state_dict(a.state_dict())
        opts = [make_optimizer(a, cfg), plain(b.parameters(), cfg)]
        assert opts[0].defaults["fused"] and not opts[1].defaults.get("fused")
        for _ in range(5):
            for model, opt in zip((a, b), opts):
                opt.zero_grad()
                nn.functional.cross_entropy(model(X), y).backward()
                opt.step()
        torch.testing.assert_close(a.weight, b.weight, rtol=1e-5, atol=1e-6)


def test_early_stopping():
    stop = EarlyStopping(patience=2)
    assert stop.update(50, 0) and not stop.update(50, 1) and not stop.should_stop
    assert not stop.update(49, 2) and stop.should_stop and stop.best_epoch == 0
    assert not EarlyStopping(patience=0, bad_epochs=99).should_stop


@pytest.mark.parametrize("field, value", [("lr", -0.1), ("grad_accum_steps", 0), ("optimizer", "adam9"), ("num_workers", 0)])
def test_bad_values_name_the_field(field, value):
    with pytest.raises(ValidationError, match=field):
        TrainConfig(**{field: value})
