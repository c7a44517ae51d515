"""Weight clustering (tasks/techniques/compression/cluster.py): at most 2**bits values per layer, before and after
fine-tuning the shared values, a bit-packed stored form that rebuilds the same weights, clear config errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch import nn

from optforge.tasks.techniques.compression.cluster import ClusterConfig, bake, cluster, pack
from optforge.tasks.techniques.compression.packing import load_packed, pack_bits, unpack_bits
from optforge.tasks.techniques.data.data import DataConfig, load_splits
from optforge.tasks.techniques.data.sources import prepare
from optforge.tasks.techniques.models.models import ModelConfig, ModelSpec
from optforge.tasks.techniques.models.rebuild import build_model
from optforge.tasks.techniques.training.finetune import FinetuneConfig, finetune
from optforge.tasks.techniques.training.training import evaluate


def _distinct(model: nn.Module) -> dict[str, int]:
    return {name: len(torch.unique(m.weight.detach())) for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def test_each_layer_keeps_at_most_2_to_the_bits_values_through_finetuning_and_baking(tmp_path):
    s = load_splits(prepare(DataConfig(), tmp_path))
    torch.manual_seed(0)
    model = build_model(ModelSpec(ModelConfig(hidden=(128,)).to_dict(), s.contract.to_dict()))
    finetune(model, s.train, s.val, FinetuneConfig(epochs=8, lr=3e-3, kd_alpha=0))
    fp32 = evaluate(model, s.test)["accuracy"]
    cfg = ClusterConfig(bits=2, min_weights=1000)
    kept = cluster(model, cfg)
    assert kept == {"net.0": 4, "net.3": 4}  # 64x128 and 128x10 weights; each 4 shared values
    clustered = evaluate(model, s.val)["accuracy"]
    finetune(model, s.train, s.val, FinetuneConfig(epochs=4, lr=3e-3, kd_alpha=0))
    tuned = evaluate(model, s.val)["accuracy"]
    assert all(n <= 4 for n in _distinct(model).values())  # the centroids moved, the clusters did not
    books = bake(model)
    assert set(books) == {"net.0", "net.3"} and all(n <= 4 for n in _distinct(model).values())
    # Fine-tuning keeps its best validation epoch, so validation accuracy cannot fall (on test it could, by a
    # row, on another CPU); 2 bits: fine-tuning wins most of it back.
    assert tuned >= clustered and evaluate(model, s.test)["accuracy"] > fp32 - 3, (fp32, clustered, tuned)

    size = pack(model, books, cfg.bits, tmp_path / "packed.npz")
    float_bytes = sum(t.numel() * 4 for t in model.state_dict().values())
    # 2-bit indices instead of 32-bit floats (16x), plus float32 biases and codebooks and ~200 bytes of .npz
    # framing per array, which weigh on a model this small.
    assert size < float_bytes / 6
    restored = load_packed(tmp_path / "packed.npz")
    assert restored.keys() == model.state_dict().keys()
    for key, tensor in model.state_dict().items():
        torch.testing.assert_close(restored[key], tensor, rtol=0, atol=0)


def test_small_layers_keep_their_weights_and_few_values_need_no_kmeans():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(100, 20))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([-1.0, 0.5, 2.0]).repeat(667)[:2000].reshape(20, 100))
    assert cluster(model, ClusterConfig(bits=3, min_weights=100)) == {"1": 3}
    assert len(torch.unique(model[1].weight.detach())) == 3 and not hasattr(model[0], "parametrizations")


@pytest.mark.parametrize("bits", [1, 3, 5, 8])
def test_bits_pack_and_unpack(bits):
    idx = np.random.default_rng(bits).integers(0, 2**bits, 1001)
    packed = pack_bits(idx, bits)
    assert len(packed) == -(-1001 * bits // 8)
    np.testing.assert_array_equal(unpack_bits(packed, bits, 1001), idx)


@pytest.mark.parametrize("bits", [0, 9])
def test_bits_out_of_range_is_a_config_error(bits):
    with pytest.raises(ValidationError, match="bits"):
        ClusterConfig(bits=bits)
