"""ONNX Runtime transformer fusion (tasks/techniques/onnx/fuse.py) on a tiny Hugging Face BERT: fewer nodes, fused
Attention / LayerNorm / GELU operators, the same logits; dynamic INT8 of the fused graph runs."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from optforge.tasks.techniques.compression.graph_prune import prune_channels
from optforge.tasks.techniques.contract import text_contract
from optforge.tasks.techniques.onnx.export import max_abs_diff
from optforge.tasks.techniques.onnx.fuse import attention_shape, export_for_fusion, fuse, unsupported_reason
from optforge.tasks.techniques.onnx.ort_session import onnx_predictor
from optforge.tasks.techniques.onnx.quantize import DynamicQuantConfig, quantize_dynamic_int8
from tests.techniques.helpers import tiny_bert, tiny_resnet


def _feeds(rows=3, length=11):
    ids = np.random.default_rng(0).integers(0, 60, (rows, length))
    mask = np.ones_like(ids)
    mask[0, 7:] = 0  # a padded row: the fused Attention must honour the mask
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("pruned", [False, True])
def test_fused_bert_has_fewer_nodes_and_the_same_logits(tmp_path, pruned):
    bert, contract = tiny_bert(layers=2, hidden=64, heads=4), text_contract(16, 3, {})
    if pruned:  # half the heads gone: layer norms and GELU still fuse, and the logits must still agree
        bert, _ = prune_channels(copy.deepcopy(bert), contract, 0.5)
    raw = export_for_fusion(bert, contract, tmp_path / "raw.onnx", opset=18)
    counts = fuse(raw, tmp_path / "fused.onnx", bert.config.to_dict(), *attention_shape(bert))
    # ORT fuses Attention only where the Q/K/V width equals the hidden size: not after head pruning.
    assert counts["Attention"] == (0 if pruned else 2)
    assert counts["SkipLayerNormalization"] == 4 and counts["BiasGelu"] == 2
    assert counts["nodes_after"] < counts["nodes_before"] / (3 if not pruned else 2)
    assert max_abs_diff(bert, tmp_path / "fused.onnx", _feeds()) < 1e-4
    assert bert.config._attn_implementation == "sdpa"  # the model's own setting is given back


def test_dynamic_int8_of_the_fused_graph_runs_close_to_float(tmp_path):
    bert, contract = tiny_bert(layers=2, hidden=64, heads=4), text_contract(16, 3, {})
    raw = export_for_fusion(bert, contract, tmp_path / "raw.onnx", opset=18)
    fuse(raw, tmp_path / "fused.onnx", bert.config.to_dict(), *attention_shape(bert))
    int8 = quantize_dynamic_int8(tmp_path / "fused.onnx", tmp_path / "int8.onnx", DynamicQuantConfig())
    fp32, q = onnx_predictor(tmp_path / "fused.onnx")(_feeds()), onnx_predictor(int8)(_feeds())
    assert np.abs(q - fp32).max() < 0.1


def test_models_without_an_optimizer_family_say_why():
    assert "model_type 'resnet' has no ONNX Runtime optimizer family" in unsupported_reason(tiny_resnet().config.to_dict())
    assert "not one" in unsupported_reason(None)
    assert unsupported_reason(tiny_bert().config.to_dict()) is None
