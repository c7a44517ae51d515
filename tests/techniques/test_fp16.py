"""FP16 ONNX on a toy MLP: FP16 initializers, FP32 edges when asked, valid graph order, runs in ORT."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto

from optforge.tasks.techniques.contract import table_contract
from optforge.tasks.techniques.models.models import MLP
from optforge.tasks.techniques.onnx.export import ExportConfig, export_onnx
from optforge.tasks.techniques.onnx.fp16 import Fp16Config, convert_fp16, fp16_initializer_share, topological_sort
from optforge.tasks.techniques.onnx.static import logits
from tests.techniques.helpers import table_part


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    torch.manual_seed(0)
    return export_onnx(MLP(16, 3, (64, 64), dropout=0.0), table_contract(16, 3), tmp_path_factory.mktemp("toy") / "model.onnx", ExportConfig())


def _io_types(path):
    graph = onnx.load(str(path)).graph
    return [v.type.tensor_type.elem_type for v in (*graph.input, *graph.output)]


def test_fp16_has_fp16_weights_fp32_edges_and_runs(toy, tmp_path):
    path = convert_fp16(toy, tmp_path / "fp16.onnx", Fp16Config())
    assert fp16_initializer_share(path) == 1.0
    assert _io_types(path) == [TensorProto.FLOAT, TensorProto.FLOAT]
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)  # topologically sorted, unlike the raw converter output
    x = table_part(np.random.default_rng(0).normal(size=(8, 16)))
    out, ref = logits(path, x), logits(toy, x)
    assert out.dtype == np.float32 and np.allclose(out, ref, atol=1e-2, rtol=1e-2)
    assert _weight_bytes(path) * 2 == _weight_bytes(toy)


def _weight_bytes(path) -> int:
    return sum(len(i.raw_data) for i in onnx.load(str(path)).graph.initializer)


def test_fp16_io_and_blocked_ops_follow_the_config(toy, tmp_path):
    half_io = convert_fp16(toy, tmp_path / "a.onnx", Fp16Config(keep_io_types=False))
    assert _io_types(half_io) == [TensorProto.FLOAT16, TensorProto.FLOAT16]
    session = ort.InferenceSession(str(half_io), providers=["CPUExecutionProvider"])
    assert session.run(None, {"input": np.zeros((2, 16), np.float16)})[0].dtype == np.float16
    blocked = convert_fp16(toy, tmp_path / "b.onnx", Fp16Config(op_block_list=("Gemm",)))
    assert fp16_initializer_share(blocked) == 0.0  # Gemm weights stay FP32 when Gemm is blocked


def test_topological_sort_orders_appended_nodes():
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", ["b"], ["c"], name="second"), onnx.helper.make_node("Relu", ["a"], ["b"], name="first")],
        "g", [onnx.helper.make_tensor_value_info("a", TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("c", TensorProto.FLOAT, [1])],
    )
    topological_sort(graph)
    assert [n.name for n in graph.node] == ["first", "second"]


def test_missing_or_invalid_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.onnx"):
        convert_fp16(tmp_path / "nope.onnx", tmp_path / "out.onnx", Fp16Config())
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00\x01garbage")
    with pytest.raises(ValueError, match="bad.onnx is not an ONNX model"):
        convert_fp16(bad, tmp_path / "out.onnx", Fp16Config())
