"""Block-circulant layers by FFT (tasks/techniques/compression/circulant.py): the layer equals its dense expansion, the
projection of a dense layer is its nearest block-circulant one, it exports to ONNX (DFT) with the same
outputs, and a block that does not divide a width is a clear error."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from optforge.tasks.techniques.compression.circulant import (
    BlockCirculantLinear,
    CirculantConfig,
    apply_blocks,
    chosen_layers,
    to_circulant,
)
from optforge.tasks.techniques.contract import table_contract
from optforge.tasks.techniques.onnx.export import ExportConfig, export_onnx, max_abs_diff
from tests.techniques.helpers import rows


@pytest.mark.parametrize("block", [2, 4, 8])
def test_the_layer_equals_its_dense_expansion(block):
    torch.manual_seed(block)
    layer = BlockCirculantLinear(16, 24, block)
    nn.init.normal_(layer.columns)
    nn.init.normal_(layer.bias)
    w = layer.dense()
    assert w.shape == (24, 16)
    for i in range(0, 24, block):  # every block is circulant: each row is the previous one shifted right
        for j in range(0, 16, block):
            b = w[i:i + block, j:j + block]
            torch.testing.assert_close(b[1:], torch.roll(b, 1, dims=1)[:-1])
    x = torch.randn(5, 16)
    torch.testing.assert_close(layer(x), x @ w.T + layer.bias, rtol=1e-5, atol=1e-5)
    assert sum(p.numel() for p in layer.parameters()) == 16 * 24 // block + 24


def test_projection_keeps_a_circulant_layer_and_averages_the_diagonals_of_others():
    torch.manual_seed(0)
    circ = BlockCirculantLinear(8, 8, 4)
    nn.init.normal_(circ.columns)
    dense = nn.Linear(8, 8)
    with torch.no_grad():
        dense.weight.copy_(circ.dense())
    torch.testing.assert_close(BlockCirculantLinear.from_linear(dense, 4).dense(), circ.dense())
    noisy = nn.Linear(8, 8)
    projected = BlockCirculantLinear.from_linear(noisy, 4).dense()
    # The nearest circulant: the error is orthogonal to every circulant direction (residual sums to 0 per diagonal).
    residual = (noisy.weight.detach() - projected).reshape(2, 4, 2, 4).permute(0, 2, 1, 3)
    r = torch.arange(4)
    for k in range(4):
        torch.testing.assert_close(residual[..., r, (r - k) % 4].sum(-1), torch.zeros(2, 2), atol=1e-6, rtol=0)


def test_a_converted_mlp_exports_through_dft_and_rebuilds(tmp_path):
    import onnx

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10)).eval()
    blocks = to_circulant(model, CirculantConfig(block=16))
    assert blocks == {"0": 16, "2": 16}  # the classifier (4) stays dense
    contract = table_contract(64, 10)
    path = export_onnx(model, contract, tmp_path / "m.onnx", ExportConfig())
    assert "DFT" in {n.op_type for n in onnx.load(str(path)).graph.node}
    x = np.random.default_rng(0).standard_normal((7, 64)).astype(np.float32)
    assert max_abs_diff(model, path, rows(x)) < 1e-4
    fresh = apply_blocks(nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10)),
                         blocks)
    fresh.load_state_dict(model.state_dict())  # the same parameters: the spec's record rebuilds the architecture


def test_bad_settings_are_named():
    model = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 10))
    with pytest.raises(ValueError, match=r"compress.circulant.block: 64 does not divide .*'0': \(96, 64\)"):
        chosen_layers(model, CirculantConfig(block=64))
    with pytest.raises(ValueError, match="compress.circulant.layers: \\['9'\\] are not Linear layers"):
        chosen_layers(model, CirculantConfig(layers=["9"]))
    with pytest.raises(ValueError, match="no Linear layer but the last"):
        chosen_layers(model, CirculantConfig(min_features=128))
    with pytest.raises(ValueError, match="block"):
        CirculantConfig(block=1)
