import itertools
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from pydantic import ValidationError
from torch import nn

from optforge.tasks.techniques.contract import table_contract
from optforge.tasks.techniques.onnx.export import ExportConfig, export_onnx
from optforge.tasks.techniques.onnx.quantize import DynamicQuantConfig, quantize_dynamic_int8

F, C = 16, 4
QUANT_OPS = {"DynamicQuantizeLinear", "MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat"}


def toy_data(n=512, seed=0):
    """Linearly separable: the label is the arg-max of a fixed random projection."""
    X = np.random.default_rng(seed).normal(size=(n, F)).astype(np.float32)
    y = (X @ np.random.default_rng(1234).normal(size=(F, C))).argmax(1)  # same projection for every seed
    return X, y


@pytest.fixture(scope="module")
def fp32_onnx(tmp_path_factory):
    """A trained MLP, wide enough (21 kB of fp32 weights) that INT8 weights visibly shrink the file."""
    torch.manual_seed(0)
    X, y = toy_data()
    model = nn.Sequential(nn.Linear(F, 256), nn.ReLU(), nn.Linear(256, C))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(model(torch.from_numpy(X)), torch.from_numpy(y)).backward()
        opt.step()
    return export_onnx(model.eval(), table_contract(F, C), tmp_path_factory.mktemp("fp32") / "model.onnx", ExportConfig())


def run(path, X):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["logits"], {"input": X})[0]


@pytest.mark.parametrize(
    ("weight_type", "per_channel", "preprocess"),
    list(itertools.product(["qint8", "quint8"], [False, True], [True, False])),
)
def test_quantized_model_is_smaller_int8_and_agrees(fp32_onnx, tmp_path, weight_type, per_channel, preprocess):
    cfg = DynamicQuantConfig(weight_type=weight_type, per_channel=per_channel, preprocess=preprocess)
    dst = quantize_dynamic_int8(fp32_onnx, tmp_path / "out" / "int8.onnx", cfg)
    assert dst == tmp_path / "out" / "int8.onnx"
    assert sorted(p.name for p in dst.parent.iterdir()) == ["int8.onnx"]  # temp files are gone
    assert dst.stat().st_size < 0.5 * fp32_onnx.stat().st_size
    model = onnx.load(str(dst))
    assert {n.op_type for n in model.graph.node} & QUANT_OPS
    int8 = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8}
    assert sum(t.data_type in int8 and len(t.dims) == 2 for t in model.graph.initializer) == 2  # both weights
    X, y = toy_data(300, seed=1)
    ref, got = run(fp32_onnx, X), run(dst, X)
    assert got.shape == ref.shape == (300, C)
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.9
    assert (got.argmax(1) == y).mean() >= 0.85  # still a working classifier
    assert run(dst, X[:1]).shape == (1, C)  # batch axis stays dynamic


def test_failure_leaves_no_partial_output(fp32_onnx, tmp_path, monkeypatch):
    import onnxruntime.quantization

    def half_write_then_crash(model_input, model_output, **kwargs):
        open(model_output, "wb").write(b"partial")
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(onnxruntime.quantization, "quantize_dynamic", half_write_then_crash)
    with pytest.raises(ValueError, match=r"quantization of .*model.onnx failed: RuntimeError: simulated crash"):
        quantize_dynamic_int8(fp32_onnx, tmp_path / "int8.onnx", DynamicQuantConfig())
    assert not list(tmp_path.iterdir())


def test_bad_sources_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.onnx"):
        quantize_dynamic_int8(tmp_path / "absent.onnx", tmp_path / "q.onnx", DynamicQuantConfig())
    text = tmp_path / "readme.onnx"
    text.write_text("not protobuf at all\n")
    with pytest.raises(ValueError, match=r"readme.onnx is not an ONNX model"):
        quantize_dynamic_int8(text, tmp_path / "q.onnx", DynamicQuantConfig())
    assert not (tmp_path / "q.onnx").exists()


def test_config_rejects_bad_values_and_round_trips():
    with pytest.raises(ValidationError, match="weight_type"):
        DynamicQuantConfig(weight_type="int4")
    with pytest.raises(ValidationError, match="per_chanel"):
        DynamicQuantConfig(per_chanel=True)
    cfg = DynamicQuantConfig(weight_type="quint8", per_channel=True, preprocess=False)
    assert DynamicQuantConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_bert_preprocess_falls_back_and_leaves_nothing_in_the_working_directory(tmp_path, monkeypatch):
    """ORT's symbolic shape inference gives up on the dynamo export of a BERT with a dynamic sequence axis and
    saves its partial model (weights as UUID-named files) into the working directory; preprocess falls back
    to ONNX's shape inference and removes that debris."""
    from transformers import BertConfig, BertForSequenceClassification

    from optforge.tasks.techniques.contract import text_contract
    from optforge.tasks.techniques.onnx.quantize import SHAPE_DEBRIS, preprocess

    torch.manual_seed(0)
    bert = BertForSequenceClassification(BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=1,
                                                    num_attention_heads=2, intermediate_size=32,
                                                    max_position_embeddings=32, num_labels=3)).eval()
    src = export_onnx(bert, text_contract(12, 3, {}), tmp_path / "bert.onnx", ExportConfig())
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    (cwd / "mine.txt").write_text("a user's file")
    assert preprocess(src, tmp_path / "pre.onnx") is False  # the fallback ran
    assert sorted(p.name for p in cwd.iterdir()) == ["mine.txt"], f"left behind: {SHAPE_DEBRIS} and its data"
    session = ort.InferenceSession(str(tmp_path / "pre.onnx"), providers=["CPUExecutionProvider"])
    ids = np.random.default_rng(0).integers(0, 60, (2, 7))
    (logits,) = session.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})
    assert logits.shape == (2, 3)
