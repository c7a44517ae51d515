"""The report stage and the ``report``/``compare`` commands against a real MLflow store (no Ray, no training).

A "pipeline run" here is what the flow leaves in MLflow: a parent run tagged optforge.pipeline=optimize,
one benchmark child run per variant (hand-made metrics) and the real register task's run.
"""

import argparse
import json
from pathlib import Path

import mlflow
import numpy as np
import onnx
import pytest
from mlflow import MlflowClient
from onnx import TensorProto, helper, numpy_helper
from prefect import flow

from optforge.flows.inspect_cmds import add_parsers
from optforge.tasks.runtime.refs import DataRef, ModelRef, VariantResult
from optforge.tasks.runtime.tracking import child_run, configure
from optforge.tasks.stages.register import register
from optforge.tasks.stages.report import report
from optforge.tasks.techniques.contract import table_contract
from optforge.tasks.techniques.data.data import Part, Splits, save_splits
from optforge.tasks.techniques.measurement.selection import RegisterConfig

CFG = RegisterConfig(model_name="report-test", baseline="onnx_fp32", max_accuracy_drop=2.0)
W = np.random.default_rng(0).normal(size=(8, 3)).astype(np.float32)
METRICS = {"onnx_fp32": (100.0, 1.0, 1.0), "onnx_int8_dynamic": (99.0, 0.4, 0.3), "onnx_tiny": (90.0, 0.1, 0.05)}


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="optforge")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture
def store(mlflow_store):
    return mlflow_store


@pytest.fixture
def pipeline_run(store, tmp_path):
    """A finished pipeline run in experiment 'reports'; returns (run id, report task inputs)."""
    X = np.random.default_rng(1).normal(size=(120, 8)).astype(np.float32)
    y = (X @ W).argmax(1)
    contract = table_contract(8, 3)
    part = Part({"input": X}, y)
    data = DataRef(str(save_splits(Splits(contract, part, part, part), tmp_path / "splits")), "fp-1", contract.to_dict())
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "W"], ["logits"])],
        "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 3])],
        [numpy_helper.from_array(W, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, str(tmp_path / "m.onnx"))
    refs = [ModelRef(n, "onnx", str(tmp_path / "m.onnx"), "sha") for n in METRICS]
    configure("reports")
    with mlflow.start_run(run_name="optimize-test", tags={"optforge.pipeline": "optimize"}) as parent:
        pid = parent.info.run_id
        mlflow.set_tag("optforge.data_fingerprint", data.sha256)
        results = []
        for name, (acc, lat, size) in METRICS.items():
            metrics = {
                "accuracy": acc,
                "latency_ms_p50_b1": lat,
                "latency_ms_p95_b1": lat * 1.5,
                "throughput_sps_b64": 64 / lat,
                "size_mb": size,
                "params": 24.0,
            }
            with child_run(
                pid, "benchmark", run_name=name, tags={"optforge.variant": name, "optforge.format": "onnx"}
            ) as r:
                mlflow.log_metrics(metrics)
            results.append(VariantResult(name, metrics, r.info.run_id))
        registration = register.fn(CFG, results, refs, data, pid)
        mlflow.set_tags({"optforge.registered": registration.variant, "optforge.register_reason": registration.reason})
    inputs = {
        "cfg": CFG,
        "results": results,
        "variants": refs,
        "registration": registration,
        "workdir": str(tmp_path / "work"),
        "parent_run_id": pid,
    }
    return pid, inputs


def test_report_stage_logs_files_and_the_cli_rebuilds_them(pipeline_run, store, tmp_path, capsys):
    pid, inputs = pipeline_run
    ref = report.fn(**inputs)
    client = MlflowClient(store)
    logged = sorted(a.path for a in client.list_artifacts(pid, "report"))
    assert logged == ["report/pareto.png", "report/report.html", "report/report.md"]
    assert client.get_run(pid).data.tags["optforge.report"] == "report/report.html"
    md = Path(ref.markdown).read_text()
    assert "**Registered report-test version 1 (onnx_int8_dynamic) as 'champion'.**" in md
    assert "| onnx_tiny | onnx | 90.00 | -10.00 | 0.1 |" in md and "misses goals: accuracy 90.00% < 98.00%" in md

    assert cli("report", pid, "--out", str(tmp_path / "again")) == 0
    assert (tmp_path / "again" / "report.md").read_text() == md  # same files from MLflow alone
    assert (tmp_path / "again" / "pareto.png").stat().st_size > 10_000
    assert "Registered report-test version 1" in capsys.readouterr().out


def test_report_of_a_run_whose_stages_came_from_the_cache(pipeline_run, store, tmp_path):
    """A cached run has no stage children; its stage.*.run_id tags point at the runs that did the work."""
    pid, _ = pipeline_run
    client = MlflowClient(store)
    exp_id = mlflow.get_experiment_by_name("reports").experiment_id
    children = client.search_runs(
        [exp_id], f"tags.mlflow.parentRunId = '{pid}'", order_by=["attributes.start_time ASC"]
    )
    by_stage = {}
    for run in children:
        by_stage.setdefault(run.data.tags["optforge.stage"], []).append(run.info.run_id)
    with mlflow.start_run(run_name="cached", tags={"optforge.pipeline": "optimize"}) as cached:
        mlflow.set_tags({f"optforge.stage.{stage}.run_id": ",".join(ids) for stage, ids in by_stage.items()})
    assert cli("report", cached.info.run_id, "--out", str(tmp_path / "cached")) == 0
    md = (tmp_path / "cached" / "report.md").read_text()
    assert "**Registered report-test version 1 (onnx_int8_dynamic) as 'champion'.**" in md
    assert md.count("| onnx_") == len(METRICS)


def test_report_of_a_bad_run_id_says_what_it_is(pipeline_run, store, capsys):
    pid, _ = pipeline_run
    assert cli("report", "0123456789abcdef0123456789abcdef") == 1
    assert "error: no MLflow run '0123456789abcdef0123456789abcdef'" in capsys.readouterr().err
    child = MlflowClient(store).search_runs(
        [mlflow.get_experiment_by_name("reports").experiment_id], "tags.`optforge.stage` = 'register'"
    )[0]
    assert cli("report", child.info.run_id) == 1
    assert f"is a 'register' stage run; its pipeline run is {pid}" in capsys.readouterr().err


def test_compare_prints_runs_and_variants(pipeline_run, capsys):
    pid, _ = pipeline_run
    assert cli("compare", "--experiment", "reports", "--last", "3") == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["run", "started", "(UTC)", "status"]
    first = next(line for line in lines if line.startswith(pid[:12]))
    assert "FINISHED" in first and "onnx_fp32" in first and "1.00x" in first
    assert any("onnx_int8_dynamic" in line and "2.50x" in line and line.endswith("v1 champion") for line in lines)
    assert "report-test now: champion v1" in out
    assert cli("compare", "--experiment", "nope") == 1
    assert "no MLflow experiment named 'nope'" in capsys.readouterr().err


def test_report_stage_publishes_prefect_artifacts(pipeline_run):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, TaskRunFilter

    _, inputs = pipeline_run

    @flow(name="report-only")
    def report_only():
        return report(**inputs)

    report_only()
    with get_client(sync_client=True) as client:
        # Every field spelled out: this Prefect server answers 422 to the client's None defaults.
        keys = ArtifactFilter(key=ArtifactFilterKey(any_=["optforge-variants", "optforge-report"]))
        arts = client.read_artifacts(
            artifact_filter=keys,
            flow_run_filter=FlowRunFilter(),
            task_run_filter=TaskRunFilter(),
            limit=10,
            offset=0,
            sort="CREATED_DESC",
        )
    by_type: dict = {}
    for artifact in arts:  # newest first; other tests of the session publish these keys too
        by_type.setdefault(artifact.type, artifact)
    table = by_type["table"].data if isinstance(by_type["table"].data, list) else json.loads(by_type["table"].data)
    assert [row["variant"] for row in table] == list(METRICS) and table[1]["verdict"] == "selected"
    assert "## Variants" in by_type["markdown"].data and "report/` artifacts" in by_type["markdown"].data
