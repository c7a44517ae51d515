"""A Ray Train worker process killed with SIGKILL mid-training: Ray Train restarts the worker group
from the last checkpoint and the run completes with normal accuracy.

Training runs in a child process with its own local Ray, so the killed worker cannot disturb the Ray
that other tests share in the pytest process.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

pytestmark = pytest.mark.slow

TRAIN = """
import json, sys
from dataclasses import asdict
from pathlib import Path
from optforge.tasks.techniques.data.data import DataConfig, load_splits
from optforge.tasks.techniques.data.sources import prepare
from optforge.tasks.techniques.models.models import ModelConfig, ModelSpec
from optforge.tasks.techniques.training.training import TrainConfig
from optforge.tasks.workers.training_driver import run_training
from optforge.tasks.workers.worker_common import WorkerConfig

tmp, uri, run_id = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
data_path = prepare(DataConfig(), tmp / "data")
spec = ModelSpec(ModelConfig(hidden=(64,)).to_dict(), load_splits(data_path).contract.to_dict())
cfg = TrainConfig(epochs=12, batch_size=32, lr=0.01, patience=0, max_failures=2)
worker = WorkerConfig(cfg.to_dict(), asdict(spec), str(data_path), uri, run_id)
summary = run_training(worker, tmp / "ray", "wf", tmp / "model")
(tmp / "summary.json").write_text(json.dumps(summary))
"""


def _train_worker_pids(parent: int) -> list[int]:
    """Ray names its worker processes after the actor ('ray::RayTrainWorker...'); only ours count."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if b"RayTrainWorker" in (entry / "cmdline").read_bytes() and os.getsid(int(entry.name)) == parent:
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def test_killed_worker_is_replaced_and_training_completes(tmp_path, mlflow_store):
    client = MlflowClient(mlflow_store)
    run_id = client.create_run(client.create_experiment("wf")).info.run_id
    proc = subprocess.Popen([sys.executable, "-c", TRAIN, str(tmp_path), mlflow_store, run_id],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while len(list((tmp_path / "ray").glob("wf/checkpoint_*"))) < 2:
            assert time.monotonic() < deadline and proc.poll() is None, "training made no checkpoints"
            time.sleep(0.2)
        victims = _train_worker_pids(proc.pid)
        assert len(victims) == 2, victims
        os.kill(victims[1], signal.SIGKILL)
        out, _ = proc.communicate(timeout=300)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # Ray's processes, if anything was left behind
        except ProcessLookupError:
            pass

    assert proc.returncode == 0, out[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["epochs_run"] == 12
    assert summary["best_val_accuracy"] > 85
    history = client.get_metric_history(run_id, "val_accuracy")
    assert sorted({m.step for m in history}) == list(range(12))
    assert not Path(f"/proc/{victims[1]}").exists()
