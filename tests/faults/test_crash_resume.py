"""A real SIGKILL of a real `optforge run` in the middle of training, then the same command again."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

pytestmark = pytest.mark.slow


def _wait_for(predicate, timeout: float, what: str, proc=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended (rc={proc.returncode}) before {what}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_sigkill_mid_training_then_resume(tiny_config, tmp_path, prefect_api_url):
    cfg = yaml.safe_load(tiny_config.read_text())
    cfg["train"]["epochs"] = 12  # long enough to be killed after a few epochs' checkpoints
    tiny_config.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "PREFECT_API_URL": prefect_api_url}
    cmd = [str(Path(sys.executable).with_name("optforge")), "run", "--config", str(tiny_config)]
    ray_dir = tmp_path / "work" / "ray"

    first = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    try:
        _wait_for(lambda: len(list(ray_dir.glob("train-*/checkpoint_*"))) >= 3, 240, "3 training checkpoints", first)
        os.kill(first.pid, signal.SIGKILL)  # the driver alone, as the OOM killer would
        first.wait(timeout=30)
    finally:
        time.sleep(1)
        try:
            os.killpg(first.pid, signal.SIGKILL)  # whatever it left behind (Prefect's temporary server)
        except ProcessLookupError:
            pass
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("optforge-test")
    (killed,) = client.search_runs([exp.experiment_id], "tags.`optforge.pipeline` = 'optimize'")
    assert killed.info.status == "RUNNING"  # nobody could end it
    epochs_before = len(client.get_metric_history(
        client.search_runs([exp.experiment_id], "tags.`optforge.stage` = 'train'")[0].info.run_id, "val_accuracy"))

    second = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]

    runs = client.search_runs([exp.experiment_id], "tags.`optforge.pipeline` = 'optimize'", order_by=["attributes.start_time ASC"])
    old, new = runs[0], runs[1]
    assert old.info.run_id == killed.info.run_id
    assert old.info.status == "KILLED" and old.data.tags["optforge.closed_by"] == new.info.run_id
    assert new.data.tags["optforge.closed_dead_runs"] == old.info.run_id
    assert new.info.status == "FINISHED"
    assert new.data.tags["optforge.stage.prepare_data.cached"] == "true"  # completed stage skipped
    train_runs = client.search_runs([exp.experiment_id], "tags.`optforge.stage` = 'train'", order_by=["attributes.start_time ASC"])
    assert [r.info.status for r in train_runs] == ["KILLED", "FINISHED"]
    resumed = train_runs[1]
    assert resumed.data.tags["optforge.resumed_from_checkpoint"] == "true"
    # The resumed training logged only the epochs that were left, starting after the last checkpoint.
    steps = [m.step for m in client.get_metric_history(resumed.info.run_id, "val_accuracy")]
    assert steps and steps[0] >= 2 and steps[-1] == 11 and epochs_before >= 3
