"""fsdp pieces without Ray: which submodules become units, the config's refusals, and the sharded state's
round trip (full state dict out, optimizer state back in) on a one-process gloo group.

The two-worker run, where each worker holds half, is tests/tasks/test_fsdp.py.
"""

import pytest
import torch
import torch.distributed as dist
from pydantic import ValidationError
from torch import nn

from optforge.tasks.techniques.training.sharding import (
    full_model_state,
    held_bytes,
    load_optimizer_shards,
    save_optimizer_shards,
    shard_model,
    shard_units,
)
from optforge.tasks.techniques.training.training import TrainConfig
from tests.techniques.helpers import is_sharded


def _mlp() -> nn.Sequential:
    # 0: 64x100+100 = 6,500 parameters, 2: 100x10+10 = 1,010
    return nn.Sequential(nn.Linear(64, 100), nn.ReLU(), nn.Linear(100, 10))


class _Tied(nn.Module):
    """An encoder whose output layer reuses the embedding's weight, plus one block used twice."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(32, 32, bias=False)
        self.body = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32))
        self.again = self.body[0]  # the same module at two places
        self.out = nn.Linear(32, 32, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, x):
        return self.out(self.again(self.body(self.embed(x))))


def test_units_by_size_children_first():
    assert shard_units(_mlp(), 5_000) == ["0"]  # the 1,010-parameter layer travels with the root
    assert shard_units(_mlp(), 1_000) == ["0", "2"]
    assert shard_units(_mlp(), 10_000) == []


def test_shared_weights_stay_in_one_unit():
    """embed and out share a weight, body.0 is also 'again': none of them may be a unit on its own."""
    units = shard_units(_Tied(), 1)
    assert "embed" not in units and "out" not in units and "again" not in units and "body.0" not in units
    assert units == ["body.1"]  # the only self-contained submodule


@pytest.mark.parametrize("overrides, field", [
    ({"optimizer": "lamb"}, "train.optimizer: lamb scales each layer's step by its whole weight's norm"),
    ({"optimizer": "lars"}, "train.optimizer: lars"),
    ({"num_workers": 1}, "train.num_workers: strategy=fsdp shards the model across workers"),
])
def test_bad_combinations_name_the_field(overrides, field):
    with pytest.raises(ValidationError, match=field):
        TrainConfig(strategy="fsdp", **overrides)
    TrainConfig(strategy="fsdp", amp=True, grad_accum_steps=2, optimizer="sgd")  # these combine


@pytest.fixture
def one_process_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_sharded_state_round_trips(one_process_group, tmp_path):
    torch.manual_seed(0)
    model = shard_model(_Tied(), 1)
    assert is_sharded(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    x = torch.randn(8, 32)
    model(x).square().mean().backward()
    opt.step()

    full = full_model_state(model)
    plain = _Tied()
    plain.load_state_dict(full)  # a normal model again, tie included
    assert not is_sharded(plain) and plain.out.weight is plain.embed.weight
    with torch.no_grad():
        torch.testing.assert_close(plain(x), model(x))

    # After a forward without backward (evaluation): the root unit is still gathered until resharded.
    save_optimizer_shards(model, opt, tmp_path / "shards")
    again = shard_model(_Tied(), 1)
    opt2 = torch.optim.AdamW(again.parameters(), lr=1e-2, fused=True)
    load_optimizer_shards(again, opt2, tmp_path / "shards")
    saved = {n: opt.state[p] for n, p in model.named_parameters()}
    for name, p in again.named_parameters():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(opt2.state[p][key].full_tensor() if key != "step" else opt2.state[p][key],
                                       saved[name][key].full_tensor() if key != "step" else saved[name][key])

    held = held_bytes(model, opt)
    n = sum(p.numel() for p in plain.parameters())
    assert held["param_numel"] == n  # one process: its shard is everything
    assert held["optimizer_bytes"] == 2 * 4 * n  # Adam's two fp32 moments