import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx.external_data_helper import uses_external_data
from pydantic import ValidationError
from torch import nn

from optforge.tasks.techniques.contract import table_contract
from optforge.tasks.techniques.onnx.export import ExportConfig, export_onnx, load_onnx, max_abs_diff
from tests.techniques.helpers import rows

F, C = 16, 4
TABLE = table_contract(F, C)


def toy_data(n=512, seed=0):
    """Linearly separable: the label is the arg-max of a fixed random projection."""
    X = np.random.default_rng(seed).normal(size=(n, F)).astype(np.float32)
    y = (X @ np.random.default_rng(1234).normal(size=(F, C))).argmax(1)  # same projection for every seed
    return X, y


def trained_mlp(steps=150):
    torch.manual_seed(0)
    X, y = toy_data()
    model = nn.Sequential(nn.Linear(F, 64), nn.ReLU(), nn.Linear(64, C))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(torch.from_numpy(X)), torch.from_numpy(y)).backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = trained_mlp()
    path = export_onnx(model, TABLE, tmp_path_factory.mktemp("export") / "model.onnx", ExportConfig())
    return model, path


def test_export_has_names_and_dynamic_batch(exported):
    _, path = exported
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, out.name, inp.type) == ("input", "logits", "tensor(float)")
    assert isinstance(inp.shape[0], str) and inp.shape[1] == F  # symbolic batch, fixed features
    for batch in (1, 7):
        logits = session.run(["logits"], {"input": np.zeros((batch, F), np.float32)})[0]
        assert logits.shape == (batch, C)


def test_export_is_one_checked_file_without_stale_weight_shapes(exported):
    _, path = exported
    model = load_onnx(path)
    onnx.checker.check_model(model, full_check=True)
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.onnx"]  # no external data, no temp file
    assert not any(uses_external_data(t) for t in model.graph.initializer)
    weights = {t.name for t in model.graph.initializer}
    assert weights and not weights & {vi.name for vi in model.graph.value_info}
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [18]


def test_exported_model_quantizes_without_preprocessing(exported, tmp_path):
    """The dynamo export used to fail ORT's shape inference ("differ in dimension 0") here."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    _, path = exported
    quantize_dynamic(str(path), str(tmp_path / "q.onnx"), weight_type=QuantType.QInt8)
    assert "MatMulInteger" in {n.op_type for n in onnx.load(str(tmp_path / "q.onnx")).graph.node}


def test_parity_is_tight_and_fails_for_another_model(exported):
    model, path = exported
    X, _ = toy_data(64, seed=1)
    assert 0 <= max_abs_diff(model, path, rows(X)) < 1e-4
    other = nn.Sequential(nn.Linear(F, 64), nn.ReLU(), nn.Linear(64, C))
    assert max_abs_diff(other, path, rows(X)) > 1e-2  # the export stage fails above onnx.export.parity_atol


def test_export_uses_eval_mode_and_restores_training(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(F, 32), nn.Dropout(0.5), nn.Linear(32, C)).train()
    path = export_onnx(model, TABLE, tmp_path / "sub" / "m.onnx", ExportConfig(opset=17))
    assert model.training
    assert "Dropout" not in {n.op_type for n in onnx.load(str(path)).graph.node}
    assert [o.version for o in onnx.load(str(path)).opset_import if o.domain == ""] == [17]
    assert max_abs_diff(model, path, rows(toy_data(32)[0])) < 1e-5
    assert model.training


@torch.library.custom_op("optforge_test::no_onnx", mutates_args=())
def _no_onnx(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_no_onnx.register_fake
def _(x):
    return torch.empty_like(x)


class _Unexportable(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(F, C)

    def forward(self, x):
        return _no_onnx(self.fc(x))


def test_export_failure_names_the_operator(tmp_path):
    with pytest.raises(ValueError, match=r"_Unexportable failed at operator 'optforge_test.no_onnx"):
        export_onnx(_Unexportable(), TABLE, tmp_path / "bad.onnx", ExportConfig())
    assert not list(tmp_path.iterdir())


def test_unreachable_opset_is_an_error_not_a_silent_18(tmp_path):
    # The exporter keeps opset 18 (with only a log line) when ONNX cannot convert Relu down to 13.
    with pytest.raises(ValueError, match=r"opset: requested 13 but the exporter produced 18"):
        export_onnx(trained_mlp(steps=0), TABLE, tmp_path / "m.onnx", ExportConfig(opset=13))
    assert not list(tmp_path.iterdir())


def test_load_onnx_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        load_onnx(tmp_path / "missing.onnx")
    text = tmp_path / "notes.onnx"
    text.write_text("this is not a model\n")
    with pytest.raises(ValueError, match=r"notes.onnx is not an ONNX model"):
        load_onnx(text)


@pytest.mark.parametrize(("field", "value"), [("opset", 12), ("parity_atol", 0.0), ("parity_samples", 0)])
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValidationError, match=field):
        ExportConfig(**{field: value})


def test_config_rejects_unknown_keys_and_round_trips():
    with pytest.raises(ValidationError, match="opset_version"):
        ExportConfig(opset_version=18)
    cfg = ExportConfig(opset=20, parity_atol=1e-3, parity_samples=16)
    assert ExportConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
