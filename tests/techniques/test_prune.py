import copy

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch import nn

from optforge.tasks.techniques.compression.prune import PruneConfig, measure, prune
from optforge.tasks.techniques.measurement.flops import weight_sparsity
from optforge.tasks.techniques.models.models import ModelConfig, count_params, save_model
from optforge.tasks.techniques.models.rebuild import build_model, load_model
from optforge.tasks.techniques.onnx.export import ExportConfig, export_onnx, max_abs_diff
from tests.techniques.helpers import hf_spec, rows, table_spec, tiny_bert


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


def _linear_widths(model):
    return [m.out_features for m in model.modules() if isinstance(m, nn.Linear)]


@pytest.mark.parametrize("arch, cfg", [("mlp", {"hidden": (64, 32)}), ("cnn", {"channels": (8, 16)}),
                                       ("dscnn", {"channels": (8, 16, 32)})])
def test_structured_yields_fewer_units_same_output_and_rebuilds(tmp_path, arch, cfg):
    """The zoo models take torch-pruning's path too: smaller, and rebuilt from model.json's history alone."""
    torch.manual_seed(0)
    s = spec(arch, **cfg)
    model = build_model(s).eval()
    before = count_params(model)
    rounds = []
    pruned, new_spec = prune(model, s, PruneConfig(sparsity=0.5, rounds=2, min_units=2), lambda m, r: rounds.append(r))
    assert rounds == [1, 2]
    assert new_spec.config == s.config and new_spec.pruned  # same architecture, plus the history
    assert count_params(pruned) < 0.6 * before
    x = torch.randn(3, 64)
    assert pruned(x).shape == (3, 10)
    save_model(pruned, new_spec, tmp_path)
    loaded, _ = load_model(tmp_path)  # the pruned architecture comes back from model.json alone
    torch.testing.assert_close(loaded(x), pruned(x))


def test_structured_pruned_mlp_runs_through_onnx(tmp_path):
    torch.manual_seed(0)
    s = spec(hidden=(64, 32))
    pruned, new_spec = prune(build_model(s), s, PruneConfig(sparsity=0.75, rounds=1))
    assert _linear_widths(pruned) == [16, 8, 10]  # the head keeps one output per class
    path = export_onnx(pruned, new_spec.inputs, tmp_path / "pruned.onnx", ExportConfig())
    assert max_abs_diff(pruned, path, rows(np.random.default_rng(0).normal(size=(8, 64)))) < 1e-5


@pytest.mark.parametrize("target", ["params", "flops"])
def test_a_params_or_flops_target_is_reached_not_the_channel_share(target):
    """Half the channels of each layer removes about three quarters of an MLP's inner weights, but the input and
    the head layers shrink only on one side: the search finds the channel ratio that meets the model-wide goal."""
    torch.manual_seed(0)
    s = spec(hidden=(128, 128))
    model = build_model(s).eval()
    before = measure(model, s.inputs, target)
    pruned, _ = prune(model, s, PruneConfig(sparsity=0.5, target=target, rounds=2, min_units=1))
    ratio = measure(pruned, s.inputs, target) / before
    assert 0.44 <= ratio <= 0.5  # at the goal, within a few channels
    channels, _ = prune(build_model(s).eval(), s, PruneConfig(sparsity=0.5, rounds=2, min_units=1))
    assert measure(channels, s.inputs, target) / before < 0.44  # the channel share alone overshoots


def test_a_latency_target_prunes_by_measured_time():
    torch.manual_seed(0)
    s = spec(hidden=(512, 512))
    model = build_model(s).eval()
    pruned, _ = prune(model, s, PruneConfig(sparsity=0.5, target="latency", rounds=1, min_units=1))
    assert count_params(pruned) < count_params(build_model(s))  # speed figures belong in bench/, not a test


def test_structured_keeps_the_units_with_the_largest_weights():
    torch.manual_seed(0)
    s = spec(hidden=(8,))
    model = build_model(s)
    with torch.no_grad():
        model.net[0].weight[[1, 4]] *= 100  # two units with large incoming ...
        model.net[3].weight[:, [1, 4]] *= 100  # ... and outgoing weights
    pruned, _ = prune(copy.deepcopy(model), s, PruneConfig(sparsity=0.75, rounds=1, min_units=1))
    torch.testing.assert_close(pruned.net[0].weight, model.net[0].weight[[1, 4]])


def test_structured_removal_matches_masking_the_units():
    """Dropping units must equal zeroing their activations in the original network (exact surgery)."""
    torch.manual_seed(0)
    s = spec(hidden=(16,))
    model = build_model(s).eval()
    pruned, _ = prune(copy.deepcopy(model), s, PruneConfig(sparsity=0.5, rounds=1, min_units=1))
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


def test_structured_prunes_a_user_factory_and_rebuilds_it(monkeypatch, tmp_path):
    (tmp_path / "facmodels.py").write_text(
        "import torch\ndef tiny(num_features, num_classes):\n"
        "    return torch.nn.Sequential(torch.nn.Linear(num_features, 8), torch.nn.GELU(), torch.nn.Linear(8, num_classes))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    s = table_spec(ModelConfig(arch="facmodels:tiny").to_dict(), 64, 10)
    pruned, new_spec = prune(build_model(s), s, PruneConfig(sparsity=0.5, rounds=1))
    assert _linear_widths(pruned) == [4, 10]
    save_model(pruned, new_spec, tmp_path / "m")
    assert _linear_widths(load_model(tmp_path / "m")[0]) == [4, 10]
    model, _ = prune(build_model(s), s, PruneConfig(method="unstructured", sparsity=0.5))  # generic: any model
    assert weight_sparsity(model) == pytest.approx(0.5, abs=1e-2)


def test_min_units_leaves_a_narrow_layer_whole():
    s = spec(hidden=(8, 64))
    pruned, _ = prune(build_model(s), s, PruneConfig(sparsity=0.75, rounds=1, min_units=3))
    assert _linear_widths(pruned) == [8, 16, 10]  # 8 x 0.25 = 2 < 3: the first layer keeps its 8


def test_a_factorized_model_is_not_pruned_structurally():
    s = spec(hidden=(32,))
    factorized = s.then("factorize", {"ranks": {"net.0": 4}})
    with pytest.raises(ValueError, match="prune before factorizing"):
        prune(build_model(factorized), factorized, PruneConfig())


def test_a_pruned_hugging_face_bert_rebuilds_from_its_spec(tmp_path):
    """A Hugging Face config has one head count for all layers: the pruned model is the config plus the history."""
    from optforge.tasks.techniques.contract import forward_logits, text_contract

    bert, contract = tiny_bert(hidden=32), text_contract(12, 3, {})
    s = hf_spec(bert, contract)
    pruned, new_spec = prune(bert, s, PruneConfig(sparsity=0.5, target="params", rounds=2, min_units=1))
    save_model(pruned, new_spec, tmp_path)
    loaded, _ = load_model(tmp_path)
    assert loaded.config.num_attention_heads == 4 and loaded.bert.encoder.layer[0].attention.self.num_attention_heads < 4
    x = contract.example(batch=2)
    with torch.inference_mode():
        torch.testing.assert_close(forward_logits(loaded, x), forward_logits(pruned, x))
