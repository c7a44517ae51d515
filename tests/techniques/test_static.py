"""Static INT8 (QDQ) on a toy MLP: QDQ nodes, ORT runs it, accuracy holds, calibration methods, fallback, bad input."""

import json

import numpy as np
import onnx
import pytest
import torch
import yaml
from pydantic import ValidationError

from optforge.tasks.techniques.contract import table_contract
from optforge.tasks.techniques.models.models import MLP
from optforge.tasks.techniques.onnx.export import ExportConfig, export_onnx
from optforge.tasks.techniques.onnx.static import (
    StaticQuantConfig,
    accuracy,
    count_qdq_nodes,
    logits,
    quantize_static_int8,
)
from tests.techniques.helpers import table_part


def _blobs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Three separable Gaussian clusters in 16-D: a task a small MLP learns in a few hundred steps."""
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(0).normal(0, 3, (3, 16))
    y = rng.integers(0, 3, n)
    return (centers[y] + rng.normal(0, 1, (n, 16))).astype(np.float32), y


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A trained 16-32-32-3 MLP exported with the project's (dynamo) exporter, plus train/held-out data."""
    X, y = _blobs(600, 1)
    X_val, y_val = _blobs(300, 2)
    torch.manual_seed(0)
    model = MLP(16, 3, (32, 32), dropout=0.0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(torch.from_numpy(X)), torch.from_numpy(y)).backward()
        opt.step()
    path = export_onnx(model, table_contract(16, 3), tmp_path_factory.mktemp("toy") / "model.onnx", ExportConfig())
    held_out = table_part(X_val, y_val)
    assert accuracy(path, held_out) > 95
    return path, table_part(X, y), held_out


def test_static_int8_is_qdq_runs_and_stays_accurate(toy, tmp_path):
    src, X, held_out = toy
    result = quantize_static_int8(src, tmp_path / "int8.onnx", X, StaticQuantConfig(calibration_samples=128), held_out)
    ops = {n.op_type for n in onnx.load(str(result.path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops and count_qdq_nodes(result.path) >= 6
    assert logits(result.path, held_out.head(5)).shape == (5, 3)
    assert result.accuracy_fp32 - result.accuracy_int8 <= 1.0 and result.gate_passed
    assert result.excluded_nodes == () and len(result.steps) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["int8.onnx"]  # temp files gone, output complete


@pytest.mark.parametrize("method, per_channel", [("minmax", True), ("entropy", False), ("percentile", False)])
def test_each_calibration_method_runs(toy, tmp_path, method, per_channel):
    src, X, held_out = toy
    cfg = StaticQuantConfig(method=method, per_channel=per_channel, calibration_samples=64, max_fallback_nodes=0)
    result = quantize_static_int8(src, tmp_path / "int8.onnx", X, cfg, held_out)
    assert count_qdq_nodes(result.path) > 0
    assert accuracy(result.path, held_out) >= result.accuracy_fp32 - 2.0


def test_fallback_keeps_most_sensitive_nodes_in_fp32_when_the_gate_cannot_pass(toy, tmp_path):
    src, X, held_out = toy
    # Calibrating on rows shrunk 1000x makes every activation range far too small: INT8 saturates and
    # the zero-drop gate cannot pass while any layer stays quantized, so the fallback runs to its limit.
    cfg = StaticQuantConfig(calibration_samples=64, accuracy_budget=0.0, max_fallback_nodes=2)
    shrunk = table_part(X.inputs["input"] * 1e-3, X.labels)
    result = quantize_static_int8(src, tmp_path / "int8.onnx", shrunk, cfg, held_out)
    gemms = [n.name for n in onnx.load(str(src)).graph.node if n.op_type == "Gemm"]
    assert set(result.sensitivity) == set(gemms) and len(gemms) == 3
    ranked = sorted(result.sensitivity, key=result.sensitivity.get, reverse=True)
    assert list(result.excluded_nodes) == ranked[:2]
    assert [s["excluded"] for s in result.steps] == [[], ranked[:1], ranked[:2]]
    assert result.gate_passed is False
    assert result.steps[-1]["accuracy"] > result.steps[0]["accuracy"]  # each FP32 node undoes damage
    kept = {n.name for n in onnx.load(str(result.path)).graph.node}
    assert set(ranked[:2]) <= kept  # the excluded Gemms are still plain float nodes under their names
    json.dumps(result.to_dict())  # what the task logs as fallback.json


def test_config_round_trips_and_names_bad_fields():
    cfg = StaticQuantConfig(method="entropy", per_channel=True)
    assert StaticQuantConfig.from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict()))) == cfg
    with pytest.raises(ValidationError, match="method"):
        StaticQuantConfig(method="kl-divergence")
    with pytest.raises(ValidationError, match="calibration_samples"):
        StaticQuantConfig(calibration_samples=0)


def test_bad_calibration_sets_and_files_give_clear_errors(toy, tmp_path):
    src, X, _ = toy
    with pytest.raises(ValueError, match="calibration_samples: the calibration data is empty"):
        quantize_static_int8(src, tmp_path / "a.onnx", X.head(0), StaticQuantConfig())
    with pytest.raises(ValueError, match="calibration_samples: 5000 requested but the calibration data has only 600 rows"):
        quantize_static_int8(src, tmp_path / "a.onnx", X, StaticQuantConfig(calibration_samples=5000))
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        quantize_static_int8(tmp_path / "missing.onnx", tmp_path / "a.onnx", X, StaticQuantConfig())
    text = tmp_path / "notes.onnx"
    text.write_text("not a model")
    with pytest.raises(ValueError, match="notes.onnx is not an ONNX model"):
        quantize_static_int8(text, tmp_path / "a.onnx", X, StaticQuantConfig())
    assert not (tmp_path / "a.onnx").exists()


def test_fallback_finds_the_worst_tensor_in_one_pass_and_excludes_its_reader(toy, tmp_path, monkeypatch):
    """Feature 0 gets a huge value in four calibration rows, and the first Gemm's weights for it are zeroed: the
    model's input range becomes 0..1e4 (every other input value rounds to zero) while nothing downstream
    changes. The one-pass error ranks the Gemm that reads the input first, well above the others, and
    ranking costs no quantization per node."""
    import optforge.tasks.techniques.onnx.static as sq

    src, X, held_out = toy
    model = onnx.load(str(src))
    first = next(n for n in model.graph.node if n.op_type == "Gemm")
    weight = next(i for i in model.graph.initializer if i.name == first.input[1])
    w = onnx.numpy_helper.to_array(weight).copy()
    w[..., 0] = 0  # (out, in) with transB: feature 0 feeds nothing
    weight.CopyFrom(onnx.numpy_helper.from_array(w, weight.name))
    onnx.save(model, str(tmp_path / "blind.onnx"))
    wide = X.inputs["input"].copy()
    wide[:4, 0] = 1e4
    quantizations = []
    real_call = sq._Quantizer.__call__
    monkeypatch.setattr(sq._Quantizer, "__call__", lambda self, **kw: quantizations.append(kw) or real_call(self, **kw))
    cfg = StaticQuantConfig(calibration_samples=64, accuracy_budget=0.0, max_fallback_nodes=1)
    result = quantize_static_int8(tmp_path / "blind.onnx", tmp_path / "int8.onnx", table_part(wide, X.labels), cfg,
                                  held_out)
    assert max(result.sensitivity, key=result.sensitivity.get) == first.name
    assert result.sensitivity[first.name] > 2 * max(v for k, v in result.sensitivity.items() if k != first.name)
    assert result.excluded_nodes == (first.name,)
    assert len(quantizations) == 2  # the full model, then one re-quantization per fallback step: none per node
    assert result.fallback_seconds > 0



def test_error_pass_runs_on_a_bert_graph(tmp_path):
    """BERT's QDQ graph has weights that dequantize to scalars, on which ORT's own weight-error helper fails."""
    from optforge.tasks.techniques.contract import text_contract
    from optforge.tasks.techniques.data.data import Part
    from optforge.tasks.techniques.onnx.static import node_errors
    from tests.techniques.helpers import tiny_bert

    bert, contract = tiny_bert(), text_contract(12, 3, {})
    src = export_onnx(bert, contract, tmp_path / "bert.onnx", ExportConfig())
    ids = np.random.default_rng(0).integers(0, 60, (16, 12))
    part = Part({"input_ids": ids, "attention_mask": np.ones_like(ids)}, np.zeros(16, np.int64))
    qdq = quantize_static_int8(src, tmp_path / "int8.onnx", part, StaticQuantConfig(calibration_samples=16)).path
    errors = node_errors(src, qdq, part, 4, tmp_path)
    assert errors and all(0 <= e < 10 for e in errors.values())  # every MatMul/Gemm scored, finite
