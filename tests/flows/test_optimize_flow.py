"""End to end: the real flow with local Ray (2 workers), Prefect's engine and a SQLite MLflow store."""

from uuid import UUID

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterType

from optforge.flows.optimize import optimize
from optforge.tasks.techniques.data.data import load_splits

pytestmark = pytest.mark.slow

METRICS = {"accuracy", "latency_ms_p50_b1", "latency_ms_p95_b1", "latency_ms_mean_b1", "throughput_sps_b64", "size_mb",
           "params"}
VARIANTS = {"pytorch_fp32", "onnx_fp32", "onnx_int8_dynamic", "onnx_int8_static", "onnx_fp16", "trt_fp16", "trt_int8"}


def _runs(client, exp_id, filter_string=""):
    return client.search_runs([exp_id], filter_string=filter_string, max_results=1000)


SECRET = "s3cr3t-value-that-must-never-be-logged"


def test_pipeline_tracks_registers_and_reuses_cache(tiny_config, mlflow_store, monkeypatch):
    for var in ("AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.setenv(var, SECRET)
    first = optimize(config_path=str(tiny_config))
    client = MlflowClient(mlflow_store)
    exp = client.get_experiment_by_name("optforge-test")
    parent = client.get_run(first["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["prefect.flow_run_id"]
    assert parent.data.params["train.epochs"] == "4"

    children = _runs(client, exp.experiment_id, f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    stages = {r.data.tags["optforge.stage"] for r in children}
    assert stages == {"prepare_data", "train", "export", "quantize", "static", "fp16",
                      "tensorrt", "benchmark", "register"}
    train_run = next(r for r in children if r.data.tags["optforge.stage"] == "train")
    history = client.get_metric_history(train_run.info.run_id, "val_accuracy")
    assert len(history) == 4 and [m.step for m in history] == [0, 1, 2, 3]  # one point per epoch, rank 0 only
    # MLflow's system metrics beside the curves (psutil, sampled every 2 s while training ran)
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(train_run.data.metrics)
    # Training's live progress as a Prefect progress artifact on the flow run, at 100% when the stage ended.
    with get_client(sync_client=True) as prefect:
        flow_run_id = UUID(parent.data.tags["prefect.flow_run_id"])
        (progress,) = prefect.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]), type=ArtifactFilterType(any_=["progress"])))
    assert progress.key == "train-progress" and progress.data == 100.0 and "train: done in" in progress.description

    variant_runs = {r.data.tags["optforge.variant"]: r for r in children if r.data.tags["optforge.stage"] == "benchmark"}
    assert set(variant_runs) == VARIANTS
    for run in variant_runs.values():
        assert METRICS <= set(run.data.metrics)
    assert variant_runs["pytorch_fp32"].data.metrics["accuracy"] > 85
    assert variant_runs["onnx_int8_dynamic"].data.metrics["size_mb"] < variant_runs["onnx_fp32"].data.metrics["size_mb"]

    reg = first["registration"]
    assert reg["variant"] in VARIANTS and reg["version"] == "1"
    model = mlflow.pyfunc.load_model(f"models:/optforge-test/{reg['version']}")
    splits = load_splits(tiny_config.parent / "work" / "data" / first["data_fingerprint"])  # the split folder
    out = model.predict(np.asarray(splits.test.inputs["input"][:50]))
    logits = np.asarray(out["logits"] if isinstance(out, dict) else out)  # older ONNX flavor: {output: array}
    assert logits.shape == (50, 10)
    assert (logits.argmax(1) == splits.test.labels[:50]).mean() > 0.8

    # Credentials come from the environment and never land in params or tags of any run.
    for run in _runs(client, exp.experiment_id):
        logged = {**run.data.params, **run.data.tags}
        assert not [k for k, v in logged.items() if SECRET in str(v)], run.info.run_name

    # Second identical run: every stage comes from the cache, no new training run, no new version.
    second = optimize(config_path=str(tiny_config))
    assert all(s["cached"] for s in second["stages"])
    assert len(_runs(client, exp.experiment_id, "tags.`optforge.stage` = 'train'")) == 1
    assert second["registration"]["version"] == "1"
    assert client.get_run(second["parent_run_id"]).data.tags["optforge.stage.train.run_id"] == train_run.info.run_id

