import torch
from torch import nn

from optforge.tasks.techniques.compression.factorize import factorize_layer
from optforge.tasks.techniques.contract import table_contract
from optforge.tasks.techniques.measurement.flops import count_flops, model_stats, weight_sparsity
from optforge.tasks.techniques.models.models import ModelConfig, count_params
from optforge.tasks.techniques.models.rebuild import build_model
from tests.techniques.helpers import table_spec


def test_mlp_flops_are_two_per_multiply_add():
    spec = table_spec(ModelConfig(hidden=(32,)).to_dict(), 64, 10)
    model = build_model(spec)
    assert count_flops(model, spec.inputs) == 2 * (64 * 32 + 32 * 10)
    assert count_flops(model, spec.inputs, batch_size=4) == 4 * 2 * (64 * 32 + 32 * 10)


def test_factorized_layer_counts_what_runs():
    pair = nn.Sequential(factorize_layer(nn.Linear(64, 64), 8))
    assert count_flops(pair, table_contract(64, 64)) == 2 * 8 * (64 + 64)


def test_conv_flops_and_training_mode_is_restored():
    spec = table_spec(ModelConfig(arch="cnn", channels=(4,)).to_dict(), 64, 10, (1, 8, 8))
    model = build_model(spec).train()
    # 3x3 conv, 1 -> 4 channels over 8x8 pixels, then the 4 -> 10 head.
    assert count_flops(model, spec.inputs) == 2 * (8 * 8 * 4 * 9) + 2 * 4 * 10
    assert model.training


def test_sparsity_and_stats():
    layer = nn.Linear(4, 4)
    with torch.no_grad():
        layer.weight[:2] = 0
    assert weight_sparsity(layer) == 0.5
    assert model_stats(layer, table_contract(4, 4)) == {"params": 20, "flops": 32, "sparsity": 0.5}  # zeros still cost dense FLOPs
    assert count_params(layer) == 20


def test_a_model_that_feeds_a_parameter_to_a_submodule_is_counted(tmp_path):
    """DeBERTa passes its relative-position embedding weight itself into its encoder layers: FlopCounterMode's
    gradient hooks failed on it ("Expected gradient function to be set") and took the train stage down."""
    from transformers import AutoModelForSequenceClassification

    from optforge.flows.architectures import write_text_model
    from optforge.tasks.techniques.contract import text_contract

    folder = write_text_model("deberta-v2", tmp_path / "deberta", ["alpha beta", "gamma delta"], 3)
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    assert count_flops(model, text_contract(16, 3, {})) > 0
    assert all(p.requires_grad for p in model.parameters())  # given back as it was
