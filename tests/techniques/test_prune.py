import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch import nn

from tasks.techniques.flops import weight_sparsity
from tasks.techniques.models import ModelConfig, build_model, count_params, load_model, save_model
from tasks.techniques.onnx_export import ExportConfig, export_onnx, max_abs_diff
from tasks.techniques.prune import PruneConfig, importance, prune, prune_structured, unit_groups
from tests.techniques.helpers import rows, table_spec


def spec(arch="mlp", **cfg):
    return table_spec(ModelConfig(arch=arch, **cfg).to_dict(), 64, 10, (1, 8, 8))


@pytest.mark.parametrize("sparsity, rounds", [(0.5, 1), (0.8, 3), (0.0, 1)])
def test_unstructured_reaches_the_asked_sparsity_and_is_permanent(sparsity, rounds):
    torch.manual_seed(0)
    s = spec(hidden=(64, 32))
    model, out_spec = prune(build_model(s), s, PruneConfig(method="unstructured", sparsity=sparsity, rounds=rounds))
    assert weight_sparsity(model) == pytest.approx(sparsity, abs=2e-3)  # global: over all Linear weights together
    assert out_spec == s  # same architecture; only values changed
    assert not any(k.endswith(("_orig", "_mask")) for k in model.state_dict())  # masks folded in


def test_unstructured_keeps_zeros_through_finetuning():
    torch.manual_seed(0)
    s = spec(hidden=(32,))
    x = torch.randn(64, 64)

    def finetune(model, round_):  # a few SGD steps: the pruning masks must hold the zeros at zero
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(3):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()

    model, _ = prune(build_model(s), s, PruneConfig(method="unstructured", sparsity=0.6, rounds=2), finetune)
    assert weight_sparsity(model) == pytest.approx(0.6, abs=2e-3)


@pytest.mark.parametrize("arch, cfg, field", [("mlp", {"hidden": (64, 32)}, "hidden"), ("cnn", {"channels": (8, 16)}, "channels"),
                                              ("dscnn", {"channels": (8, 16, 32)}, "channels")])
def test_structured_yields_fewer_units_same_output_and_rebuilds(tmp_path, arch, cfg, field):
    torch.manual_seed(0)
    s = spec(arch, **cfg)
    model = build_model(s).eval()
    rounds = []
    pruned, new_spec = prune(model, s, PruneConfig(sparsity=0.5, rounds=2, min_units=2), lambda m, r: rounds.append(r))
    assert rounds == [1, 2]
    widths = new_spec.config[field]
    assert widths == [max(2, round(round(w * 0.5**0.5) * 0.5**0.5)) for w in cfg[field]]
    assert count_params(pruned) < count_params(model)
    x = torch.randn(3, 64)
    assert pruned(x).shape == (3, 10)
    save_model(pruned, new_spec, tmp_path)
    loaded, _ = load_model(tmp_path)  # the pruned architecture comes back from model.json alone
    torch.testing.assert_close(loaded(x), pruned(x))


def test_structured_pruned_mlp_runs_through_onnx(tmp_path):
    torch.manual_seed(0)
    s = spec(hidden=(64, 32))
    pruned, new_spec = prune(build_model(s), s, PruneConfig(sparsity=0.75, rounds=1))
    assert new_spec.config["hidden"] == [16, 8]
    path = export_onnx(pruned, new_spec.inputs, tmp_path / "pruned.onnx", ExportConfig())
    assert max_abs_diff(pruned, path, rows(np.random.default_rng(0).normal(size=(8, 64)))) < 1e-5


def test_structured_keeps_the_important_units():
    torch.manual_seed(0)
    s = spec(hidden=(8,))
    model = build_model(s)
    with torch.no_grad():
        model.net[0].weight[[1, 4, 6]] *= 100  # three units with large incoming weights ...
        model.net[3].weight[:, 6] = 0  # ... but unit 6 feeds nothing forward: its path norm is 0
    (group,) = unit_groups(model)
    assert (group.producer, group.consumer) == ("net.0", "net.3")
    assert importance(model, group, 2)[6] == 0
    pruned, _ = prune_structured(model, s, 0.25, PruneConfig(min_units=1))
    torch.testing.assert_close(pruned.net[0].weight, model.net[0].weight[[1, 4]])


def test_structured_removal_matches_masking_the_units():
    """Dropping units must equal zeroing their activations in the original network (exact surgery)."""
    torch.manual_seed(0)
    s = spec(hidden=(16,))
    model = build_model(s).eval()
    pruned, _ = prune_structured(model, s, 0.5, PruneConfig(min_units=1))
    kept = {tuple(r.tolist()) for r in pruned.net[0].weight}
    mask = torch.tensor([tuple(r.tolist()) in kept for r in model.net[0].weight], dtype=torch.float32)
    x = torch.randn(5, 64)
    masked = model.net[3](torch.relu(model.net[0](x)) * mask)
    torch.testing.assert_close(pruned(x), masked)


@pytest.mark.parametrize("value", [1.0, -0.1, 1.5])
def test_sparsity_outside_zero_one_names_the_field(value):
    with pytest.raises(ValidationError, match="sparsity"):
        PruneConfig(sparsity=value)


def test_bad_prune_settings_name_the_field():
    with pytest.raises(ValidationError, match="rounds"):
        PruneConfig(rounds=0)
    with pytest.raises(ValidationError, match="method"):
        PruneConfig(method="random")


def test_structured_refuses_a_user_factory(monkeypatch, tmp_path):
    (tmp_path / "facmodels.py").write_text(
        "import torch\ndef tiny(num_features, num_classes):\n"
        "    return torch.nn.Sequential(torch.nn.Linear(num_features, 8), torch.nn.Linear(8, num_classes))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    s = table_spec(ModelConfig(arch="facmodels:tiny").to_dict(), 64, 10)
    with pytest.raises(ValueError, match="prune.method: structured pruning needs a zoo architecture"):
        prune(build_model(s), s, PruneConfig())
    model, _ = prune(build_model(s), s, PruneConfig(method="unstructured", sparsity=0.5))  # generic: any model
    assert weight_sparsity(model) == pytest.approx(0.5, abs=1e-2)


def test_min_units_floor():
    s = spec(hidden=(8, 8))
    _, new_spec = prune(build_model(s), s, PruneConfig(sparsity=0.9, rounds=1, min_units=3))
    assert new_spec.config["hidden"] == [3, 3]


def test_unknown_layer_is_refused():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.act, self.b = nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 2)

    with pytest.raises(ValueError, match="does not know layer act"):
        unit_groups(Odd())
