"""Binary weights (tasks/techniques/compression/binarize.py): each binary layer's weights are +-scale per output channel
after straight-through fine-tuning, the first and last layers keep full precision, and the one-bit stored form
rebuilds the same weights."""

from __future__ import annotations

import torch
from torch import nn

from optforge.tasks.techniques.compression.binarize import BinarizeConfig, bake, binarize, binary_layers, pack
from optforge.tasks.techniques.compression.packing import load_packed
from optforge.tasks.techniques.data.data import DataConfig, load_splits
from optforge.tasks.techniques.data.sources import prepare
from optforge.tasks.techniques.models.models import ModelConfig, ModelSpec
from optforge.tasks.techniques.models.rebuild import build_model
from optforge.tasks.techniques.training.finetune import FinetuneConfig, finetune
from optforge.tasks.techniques.training.training import evaluate


def test_binary_layers_are_plus_minus_scale_per_channel_and_the_ends_stay_float(tmp_path):
    s = load_splits(prepare(DataConfig(), tmp_path))
    torch.manual_seed(0)
    model = build_model(ModelSpec(ModelConfig(hidden=(128, 128)).to_dict(), s.contract.to_dict()))
    finetune(model, s.train, s.val, FinetuneConfig(epochs=8, lr=3e-3, kd_alpha=0))
    fp32 = evaluate(model, s.test)["accuracy"]
    cfg = BinarizeConfig()
    assert binarize(model, cfg) == ["net.3"]  # 128x128; net.0 (first) and net.6 (last) stay float
    before = evaluate(model, s.val)["accuracy"]
    finetune(model, s.train, s.val, FinetuneConfig(epochs=8, lr=3e-3, kd_alpha=0))
    tuned = evaluate(model, s.val)["accuracy"]  # its best validation epoch: never below where it started
    assert bake(model) == ["net.3"]
    w = model.net[3].weight.detach()
    scale = w.abs().amax(1, keepdim=True)
    assert (scale > 0).all() and torch.equal(w.abs(), scale.expand_as(w))  # +-scale, one scale per output channel
    assert len(torch.unique(model.net[0].weight)) > 1000 and len(torch.unique(model.net[6].weight)) > 1000
    assert tuned >= before and evaluate(model, s.test)["accuracy"] > fp32 - 4, (fp32, before, tuned)

    size = pack(model, ["net.3"], tmp_path / "packed.npz")
    restored = load_packed(tmp_path / "packed.npz")
    for key, tensor in model.state_dict().items():
        torch.testing.assert_close(restored[key], tensor, rtol=0, atol=0)
    float_bytes = sum(t.numel() * 4 for t in model.state_dict().values())
    assert size < float_bytes - 128 * 128 * 4 * 0.9  # the binary layer shrank ~32x; the float ends did not


def test_the_straight_through_estimator_trains_the_latent_weights():
    torch.manual_seed(0)
    layer = nn.Linear(64, 32)
    binarize(nn.Sequential(nn.Linear(8, 64), layer, nn.Linear(32, 2)), BinarizeConfig(min_weights=1))
    latent = layer.parametrizations.weight.original
    layer(torch.randn(5, 64)).sum().backward()
    assert latent.grad is not None and latent.grad.abs().sum() > 0
    assert len(torch.unique(layer.weight.detach().abs())) <= 32  # one magnitude per output channel


def test_without_keep_first_last_every_large_layer_is_binary():
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.Linear(64, 4))
    assert binary_layers(model, BinarizeConfig(keep_first_last=False, min_weights=1000)) == ["0", "2"]
    assert binary_layers(model, BinarizeConfig(min_weights=1000)) == ["2"]  # 0 is the first layer, 3 the last
