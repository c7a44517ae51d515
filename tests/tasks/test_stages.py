"""Each stage's task body against a real MLflow SQLite store (Ray-free; training is covered end to end)."""

import mlflow
import numpy as np
import onnx
import pytest
from mlflow import MlflowClient
from onnx import numpy_helper

from optforge.tasks.runtime.tracking import configure
from optforge.tasks.stages.benchmark import benchmark
from optforge.tasks.stages.data import prepare_data
from optforge.tasks.stages.export import export
from optforge.tasks.stages.quantize import quantize
from optforge.tasks.stages.register import register
from optforge.tasks.techniques.data.data import DataConfig, load_splits
from optforge.tasks.techniques.measurement.benchmark import BenchmarkConfig
from optforge.tasks.techniques.measurement.selection import RegisterConfig
from optforge.tasks.techniques.models.models import ModelConfig
from optforge.tasks.techniques.onnx.export import ExportConfig, export_onnx
from optforge.tasks.techniques.onnx.quantize import DynamicQuantConfig
from optforge.tasks.techniques.training.training import evaluate
from tests.trained import train_in_process

FAST_BENCH = BenchmarkConfig(warmup=2, iters_b1=20, iters_batch=2)


@pytest.fixture
def pipeline(mlflow_store, tmp_path):
    """An active parent run, the digits split, and a quickly trained small MLP saved as a model folder."""
    configure("stages")
    with mlflow.start_run(run_name="parent") as parent:
        data = prepare_data.fn(DataConfig(), None, str(tmp_path / "work"), parent.info.run_id)
        splits = load_splits(data.path)
        model, ref = train_in_process(ModelConfig(hidden=(32,)), data, splits, 5, tmp_path / "model")
        assert evaluate(model, splits.val)["accuracy"] > 85
        yield parent.info.run_id, data, ref, tmp_path / "work"


def _child(client, parent_id, stage):
    runs = client.search_runs([mlflow.get_experiment_by_name("stages").experiment_id],
                              f"tags.mlflow.parentRunId = '{parent_id}' and tags.`optforge.stage` = '{stage}'")
    return runs


def test_stages_log_child_runs_and_register(pipeline, mlflow_store):
    parent_id, data, torch_ref, work = pipeline
    client = MlflowClient(mlflow_store)
    (data_run,) = _child(client, parent_id, "prepare_data")
    assert data_run.data.tags["optforge.data_fingerprint"] == data.sha256
    assert {d.dataset.digest for d in data_run.inputs.dataset_inputs} == {data.sha256}
    assert data_run.data.params["data.source"] == "digits"

    onnx_ref = export.fn(ExportConfig(), torch_ref, data, str(work), parent_id)
    int8_ref = quantize.fn(DynamicQuantConfig(), onnx_ref, str(work), parent_id)
    results = benchmark.fn(FAST_BENCH, [torch_ref, onnx_ref, int8_ref], data, parent_id)
    reg = register.fn(RegisterConfig(model_name="stages-model", max_accuracy_drop=5.0), results,
                      [torch_ref, onnx_ref, int8_ref], data, parent_id)

    (export_run,) = _child(client, parent_id, "export")
    assert export_run.data.metrics["parity_max_abs_diff"] < 1e-4
    assert [a.path for a in client.list_artifacts(export_run.info.run_id, "onnx")] == ["onnx/model.onnx"]
    bench_runs = _child(client, parent_id, "benchmark")
    assert sorted(r.info.run_name for r in bench_runs) == ["onnx_fp32", "onnx_int8_dynamic", "pytorch_fp32"]
    assert all(r.data.metrics["accuracy"] > 80 for r in bench_runs)
    assert reg.version == "1" and reg.variant in {"pytorch_fp32", "onnx_fp32", "onnx_int8_dynamic"}
    version = client.get_model_version("stages-model", "1")
    assert version.tags["variant"] == reg.variant and version.tags["data_fingerprint"] == data.sha256
    loaded = mlflow.pyfunc.load_model("models:/stages-model/1")
    out = loaded.predict(np.asarray(load_splits(data.path).test.inputs["input"][:3]))
    assert np.asarray(out["logits"] if isinstance(out, dict) else out).shape == (3, 10)  # older ONNX flavor: dict


def test_register_nothing_when_no_variant_passes(pipeline, mlflow_store):
    parent_id, data, torch_ref, _ = pipeline
    results = benchmark.fn(FAST_BENCH, [torch_ref], data, parent_id)
    reg = register.fn(RegisterConfig(model_name="never", min_accuracy=100.0), results, [torch_ref], data, parent_id)
    assert reg.version is None and "no variant reaches 100.00%" in reg.reason
    assert MlflowClient(mlflow_store).search_registered_models() == []


def test_failed_parity_marks_the_stage_failed(pipeline, mlflow_store, monkeypatch):
    """The exported file's first weight is shifted, so ONNX Runtime's logits really differ from PyTorch's
    (a tiny ``parity_atol`` alone relied on a rounding difference that one CPU does not have)."""
    parent_id, data, torch_ref, work = pipeline

    def export_a_different_model(*args, **kwargs):
        path = export_onnx(*args, **kwargs)
        proto = onnx.load(str(path))
        weight = next(i for i in proto.graph.initializer if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 2)
        weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) + 0.5, weight.name))
        onnx.save(proto, str(path))
        return path

    monkeypatch.setattr("optforge.tasks.stages.export.export_onnx", export_a_different_model)
    with pytest.raises(ValueError, match="onnx.export.parity_atol"):
        export.fn(ExportConfig(), torch_ref, data, str(work), parent_id)
    (run,) = _child(MlflowClient(mlflow_store), parent_id, "export")
    assert run.info.status == "FAILED" and "parity_atol" in run.data.tags["optforge.error"]
