import copy

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from optforge.tasks.techniques.compression.factorize import (
    FactorizeConfig,
    breaks_even,
    choose_rank,
    factorize,
    factorize_layer,
)
from optforge.tasks.techniques.models.models import LowRank, ModelConfig, count_params, save_model
from optforge.tasks.techniques.models.rebuild import build_model, load_model
from tests.techniques.helpers import hf_spec, table_spec, tiny_bert


def spec(arch="mlp", **cfg):
    return table_spec(ModelConfig(arch=arch, **cfg).to_dict(), 64, 10, (1, 8, 8))


def test_full_rank_reproduces_the_linear_layer():
    torch.manual_seed(0)
    layer = nn.Linear(24, 16)
    pair = factorize_layer(layer, 16)
    x = torch.randn(8, 24)
    torch.testing.assert_close(pair(x), layer(x), atol=1e-5, rtol=1e-5)


def test_full_rank_reproduces_a_1x1_conv():
    torch.manual_seed(0)
    conv = nn.Conv2d(12, 20, 1, bias=False)
    pair = factorize_layer(conv, 12)
    x = torch.randn(2, 12, 5, 5)
    torch.testing.assert_close(pair(x), conv(x), atol=1e-5, rtol=1e-5)
    assert pair[1].bias is None


def test_low_rank_params_fall_as_computed():
    layer = nn.Linear(64, 32)
    pair = factorize_layer(layer, 4)
    assert count_params(pair) == 4 * (64 + 32) + 32  # n*r + r*m weights, the original bias only
    assert count_params(layer) == 64 * 32 + 32


def test_model_factorization_counts_and_rebuilds(tmp_path):
    torch.manual_seed(0)
    s = spec(hidden=(64, 64))
    model = build_model(s)
    before = count_params(model)
    out, new_spec, report = factorize(model, s, FactorizeConfig(mode="ratio", rank_ratio=0.25))
    # net.0: 64x64 -> rank 16; net.3: 64x64 -> rank 16; the head (net.6) is kept by keep_last.
    assert new_spec.factorized == {"net.0": 16, "net.3": 16}
    assert report["net.0"] == {"shape": [64, 64], "rank": 16, "break_even": 32.0, "factorized": True}
    saved = 2 * (64 * 64 - 16 * 128)
    assert count_params(out) == before - saved
    x = torch.randn(4, 64)
    save_model(out, new_spec, tmp_path)
    loaded, loaded_spec = load_model(tmp_path)  # rebuilt from model.json's "factorized" entry
    assert isinstance(loaded.net[0], LowRank) and loaded_spec.factorized == new_spec.factorized
    torch.testing.assert_close(loaded(x), out(x))


def test_layers_are_left_alone_where_rank_does_not_pay():
    # r >= m*n/(m+n): 64x64 breaks even at 32, so energy=1.0 (full rank 64) factorizes nothing.
    assert breaks_even(64, 64, 32) and not breaks_even(64, 64, 31)
    s = spec(hidden=(64,))
    model = build_model(s)
    _, new_spec, report = factorize(model, s, FactorizeConfig(energy=1.0, keep_last=False))
    assert new_spec.factorized is None
    assert not any(r["factorized"] for r in report.values())
    assert not any(isinstance(m, LowRank) for m in model.modules())


def test_energy_threshold_picks_the_smallest_sufficient_rank():
    s = torch.tensor([3.0, 2.0, 1.0, 1.0, 1.0])  # energies 9, 4, 1, 1, 1 of 16
    assert choose_rank(s, FactorizeConfig(energy=9 / 16)) == 1
    assert choose_rank(s, FactorizeConfig(energy=0.6)) == 2
    assert choose_rank(s, FactorizeConfig(energy=1.0)) == 5
    assert choose_rank(s, FactorizeConfig(mode="ratio", rank_ratio=0.5)) == 3


def test_dscnn_pointwise_convs_factorize_only_when_asked():
    torch.manual_seed(0)
    s = spec("dscnn", channels=(16, 64, 64))
    _, with_conv, _ = factorize(build_model(s), s, FactorizeConfig(mode="ratio", rank_ratio=0.1))
    _, without, _ = factorize(build_model(s), s, FactorizeConfig(mode="ratio", rank_ratio=0.1, conv1x1=False))
    assert set(with_conv.factorized) == {"features.6", "features.12"}  # the 1x1 pointwise convs
    assert without.factorized is None


@pytest.mark.parametrize("field, value", [("energy", 0), ("energy", 1.5), ("rank_ratio", 0), ("rank_ratio", 2.0),
                                          ("mode", "tucker")])
def test_bad_rank_or_energy_names_the_field(field, value):
    with pytest.raises(ValidationError, match=field):
        FactorizeConfig(**{field: value})


def test_rank_out_of_range_for_a_layer():
    with pytest.raises(ValueError, match=r"rank: 9 is outside \[1, 8\]"):
        factorize_layer(nn.Linear(8, 16), 9)
    with pytest.raises(ValueError, match="cannot factorize Conv2d"):
        factorize_layer(nn.Conv2d(4, 4, 3), 2)


def test_bert_attention_and_feed_forward_linears_factorize_and_rebuild(tmp_path):
    """Issue 13 item 4: the transformer's projections take the same rank and skip rules as the zoo's layers."""
    import numpy as np

    from optforge.tasks.techniques.contract import forward_logits, text_contract
    from optforge.tasks.techniques.onnx.export import ExportConfig, export_onnx
    from optforge.tasks.techniques.onnx.ort_session import tuned_session

    bert, contract = tiny_bert(hidden=64), text_contract(12, 3, {})
    s = hf_spec(bert, contract)
    _, _, report = factorize(copy.deepcopy(bert), s, FactorizeConfig(mode="energy", energy=1.0))
    assert not any(r["factorized"] for r in report.values())  # full rank never pays: every layer left alone
    model, new_spec, report = factorize(bert, s, FactorizeConfig(mode="ratio", rank_ratio=0.25))
    layer = model.bert.encoder.layer[0]
    for proj in (layer.attention.self.query, layer.attention.self.key, layer.attention.self.value,
                 layer.attention.output.dense, layer.intermediate.dense, layer.output.dense):
        assert isinstance(proj, LowRank)
    assert report["bert.encoder.layer.0.attention.self.query"]["rank"] == 16  # 0.25 x 64
    assert isinstance(model.classifier, nn.Linear)  # keep_last: the head keeps full rank
    save_model(model, new_spec, tmp_path / "m")
    loaded, _ = load_model(tmp_path / "m")
    x = contract.example(batch=2)
    with torch.inference_mode():
        torch.testing.assert_close(forward_logits(loaded, x), forward_logits(model, x))
    path = export_onnx(model, contract, tmp_path / "f.onnx", ExportConfig())
    ids = np.random.default_rng(0).integers(0, 60, (2, 12))
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    (logits,) = tuned_session(path).run(None, feeds)
    with torch.inference_mode():
        ref = forward_logits(model, {k: torch.from_numpy(v) for k, v in feeds.items()}).numpy()
    assert np.abs(logits - ref).max() < 1e-4
