"""A real `mlflow server` stopped in the middle of a pipeline run: restarted, the run completes with
nothing missing; left down, the run fails clearly and keeps what it computed on local disk."""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from tests.conftest import free_port
from tests.integration.conftest import BIN, http_ok, start, stop_all, wait_until

pytestmark = pytest.mark.slow


def _server(tmp: Path, port: int):
    argv = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{tmp / 'server.db'}", "--serve-artifacts",
            "--artifacts-destination", str(tmp / "artifacts")]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = start(f"mlflow-{time.monotonic_ns()}", argv, env, tmp, tmp)
    wait_until(lambda: http_ok(f"http://127.0.0.1:{port}/health"), proc, "MLflow /health")
    return proc


def _run_until_training(tiny_config: Path, tmp: Path, uri: str, epochs: int, env: dict) -> subprocess.Popen:
    cfg = yaml.safe_load(tiny_config.read_text())
    cfg["train"]["epochs"] = epochs
    cfg["onnx"] = {"static": {"enabled": False}, "fp16": {"enabled": False}}
    cfg["engines"] = {"tensorrt": {"enabled": False}}
    tiny_config.write_text(yaml.safe_dump(cfg))
    run = subprocess.Popen([str(BIN / "optforge"), "run", "--config", str(tiny_config)], cwd=tmp, text=True,
                           env={**os.environ, "MLFLOW_TRACKING_URI": uri, **env}, start_new_session=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while len(list((tmp / "work" / "ray").glob("train-*/checkpoint_*"))) < 2:
        assert run.poll() is None and time.monotonic() < deadline, "training never checkpointed"
        time.sleep(0.2)
    return run


def _kill(run: subprocess.Popen) -> None:
    try:
        os.killpg(run.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_server_restart_mid_training_is_survived(tiny_config, tmp_path, prefect_api_url):
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = _server(tmp_path, port)
    run = _run_until_training(tiny_config, tmp_path, uri, epochs=10, env={"PREFECT_API_URL": prefect_api_url})
    try:
        stop_all([server])
        time.sleep(4)  # a few epochs' metrics meet a dead server
        server = _server(tmp_path, port)
        out, err = run.communicate(timeout=300)
    finally:
        _kill(run)
        stop_all([server])
    assert run.returncode == 0, err[-3000:]
    server = _server(tmp_path, port)  # read back what arrived, through the server
    try:
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name("optforge-test")
        (parent,) = client.search_runs([exp.experiment_id], "tags.`optforge.pipeline` = 'optimize'")
        assert parent.info.status == "FINISHED"
        (train,) = client.search_runs([exp.experiment_id], "tags.`optforge.stage` = 'train'")
        steps = sorted({m.step for m in client.get_metric_history(train.info.run_id, "val_accuracy")})
        assert steps == list(range(10))  # queued during the outage, sent after it: no epoch lost
        assert client.list_artifacts(train.info.run_id, "model")
    finally:
        stop_all([server])


def test_server_gone_fails_clearly_and_keeps_local_outputs(tiny_config, tmp_path, prefect_api_url):
    port = free_port()
    server = _server(tmp_path, port)
    # MLflow's own back-off (7 tries, about two minutes per request) is what a user gets by default; this test
    # is about how the run ends, so it shortens the back-off the way a user would (MLflow's variables).
    quick = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
             "PREFECT_API_URL": prefect_api_url}
    run = _run_until_training(tiny_config, tmp_path, f"http://127.0.0.1:{port}", epochs=6, env=quick)
    try:
        stop_all([server])
        start_wait = time.monotonic()
        out, err = run.communicate(timeout=300)
        waited = time.monotonic() - start_wait
    finally:
        _kill(run)
    assert run.returncode == 1
    assert f"127.0.0.1:{port}" in err  # the message names the unreachable server
    assert "outputs of the stages that finished are kept under" in err
    assert list((tmp_path / "work" / "train").glob("*/model/model.pt"))  # the trained model is on disk
    assert waited < 240
