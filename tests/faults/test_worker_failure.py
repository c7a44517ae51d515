"""A Ray Train worker process killed with SIGKILL mid-training: Ray Train restarts the worker group
from the last checkpoint and the run completes with normal accuracy."""

import os
import signal
import threading
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tasks.techniques.data import DataConfig, load_arrays, save_splits, split
from tasks.techniques.models import ModelConfig, ModelSpec
from tasks.techniques.training import TrainConfig
from tasks.train_worker import run_training

pytestmark = pytest.mark.slow


def _train_worker_pids() -> list[int]:
    """Ray names its worker processes after the actor: 'ray::RayTrainWorker...'."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if b"RayTrainWorker" in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def test_killed_worker_is_replaced_and_training_completes(tmp_path, mlflow_store):
    cfg = DataConfig()
    X, y, shape = load_arrays(cfg)
    splits = split(X, y, shape, cfg)
    data_path = save_splits(splits, tmp_path / "splits.npz")
    spec = ModelSpec(ModelConfig(hidden=(64,)).to_dict(), splits.num_features, splits.num_classes, shape)
    train_cfg = TrainConfig(epochs=12, batch_size=32, lr=0.01, patience=0, max_failures=2)
    run_id = MlflowClient(mlflow_store).create_run(MlflowClient(mlflow_store).create_experiment("wf")).info.run_id
    storage = tmp_path / "ray"
    outcome: dict = {}

    def train():
        try:
            outcome["summary"] = run_training(train_cfg, spec, str(data_path), storage, "wf", tmp_path / "model",
                                              mlflow_tracking_uri=mlflow_store, mlflow_run_id=run_id)
        except BaseException as exc:  # surfaced by the assertions below
            outcome["error"] = exc

    thread = threading.Thread(target=train)
    thread.start()
    deadline = time.monotonic() + 180
    while len(list(storage.glob("wf/checkpoint_*"))) < 2:
        assert time.monotonic() < deadline and thread.is_alive(), f"no checkpoints: {outcome}"
        time.sleep(0.2)
    victims = _train_worker_pids()
    assert len(victims) == 2, victims
    os.kill(victims[1], signal.SIGKILL)
    thread.join(timeout=300)

    assert not thread.is_alive() and "error" not in outcome, outcome.get("error")
    summary = outcome["summary"]
    assert summary["epochs_run"] == 12
    assert summary["best_val_accuracy"] > 85
    history = MlflowClient(mlflow_store).get_metric_history(run_id, "val_accuracy")
    assert sorted({m.step for m in history}) == list(range(12))
    assert not Path(f"/proc/{victims[1]}").exists()
