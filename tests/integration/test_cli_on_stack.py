"""``optforge run`` against real servers, chosen by environment variables alone.

The same command as on a laptop, in a subprocess whose environment names an MLflow tracking
server, a Prefect server and a two-node Ray cluster. The checks read each server back: MLflow's
runs and artifacts went through the server (``mlflow-artifacts:/`` URIs, downloadable over HTTP,
stored in the server's artifact folder, nothing in the client's folder); Prefect recorded the
flow run; Ray Train placed its two workers on different nodes.
"""

import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from optforge.flows.preflight import check_environment
from tests.integration.api import flow_run, http_bytes, ray_actors

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STAGES = {"prepare_data", "train", "export", "quantize", "benchmark", "register"}


def test_preflight_passes_against_the_stack(stack):
    start = time.monotonic()
    check_environment(stack.env)  # real /health, /api/health and the GCS's gRPC preface
    assert time.monotonic() - start < 5


def test_optimize_runs_on_servers_and_two_ray_nodes(stack):
    client_dir = stack.root / "cli-cwd"
    client_dir.mkdir()
    exe = Path(sys.executable).with_name("optforge")
    proc = subprocess.run([str(exe), "run", "--config", str(stack.config)], env=stack.env, cwd=client_dir,
                          capture_output=True, text=True, timeout=400, check=False)
    (stack.root / "logs" / "optforge-run.log").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    parent_id = proc.stdout.split("MLflow parent run: ")[-1].split()[0]

    # MLflow: the runs and artifacts arrived through the tracking server.
    mlflow = MlflowClient(stack.mlflow_url)
    parent = mlflow.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    exp = mlflow.get_experiment_by_name(stack.experiment)
    assert exp.artifact_location.startswith("mlflow-artifacts:/")
    children = mlflow.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'", max_results=100)
    assert {r.data.tags["optforge.stage"] for r in children} >= STAGES
    for run in [parent, *children]:
        assert run.info.artifact_uri.startswith("mlflow-artifacts:/"), run.info.artifact_uri
    # Downloadable over plain HTTP from the server's artifact proxy ...
    path = parent.info.artifact_uri.removeprefix("mlflow-artifacts:/")
    summary = http_bytes(f"{stack.mlflow_url}/api/2.0/mlflow-artifacts/artifacts/{path}/summary.json")
    assert parent_id.encode() in summary
    train = next(r for r in children if r.data.tags["optforge.stage"] == "train")
    listing = mlflow.list_artifacts(train.info.run_id, "model")
    assert {Path(f.path).name for f in listing} >= {"model.pt", "model.json"}
    # ... stored where the server keeps them, and nothing was written next to the client.
    assert (stack.artifacts_dir / path / "summary.json").is_file()
    assert not any((client_dir / d).exists() for d in ("mlruns", "mlartifacts", "mlflow.db"))
    version = mlflow.get_latest_versions("optforge-test")[0]
    assert version.source.startswith(("models:/", "mlflow-artifacts:/"))

    # Prefect: the flow run lives on the server, linked both ways with the MLflow run.
    run = flow_run(stack.prefect_api_url, parent.data.tags["prefect.flow_run_id"])
    assert run["state"]["type"] == "COMPLETED"
    assert f"mlflow_run_id:{parent_id}" in run["tags"]

    # Ray: two Ray Train workers, one per node (each node offers one CPU, each worker needs one).
    cluster = ray_actors(stack.ray_address, stack.env)
    assert len(cluster["nodes"]) == 2
    workers = [a for a in cluster["actors"] if a["class"] == "RayTrainWorker"]
    assert workers, cluster["actors"]
    by_job: dict[str, set[str]] = {}
    for worker in workers:
        by_job.setdefault(worker["job"], set()).add(worker["node"])
    assert all(nodes == set(cluster["nodes"]) for nodes in by_job.values()), by_job
