"""Portable liveness and locking (tasks/runtime/tracking.py): psutil tells a live concurrent run from a dead one on
any OS, and filelock serialises sections with a timeout that names the lock."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest
from mlflow import MlflowClient

from optforge.tasks.runtime.tracking import close_dead_runs, configure, file_lock, process_tags


def _pipeline_run(client, experiment_id, pid: int, pid_start: str) -> str:
    tags = {**process_tags(), "optforge.pid": str(pid), "optforge.pid_start": pid_start, "optforge.pipeline": "optimize"}
    return client.create_run(experiment_id, tags=tags).info.run_id


def test_a_live_concurrent_run_is_left_and_dead_ones_are_closed(mlflow_store):
    client, experiment_id = MlflowClient(), configure("liveness")
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    try:
        live_start = _start_of(live.pid)
        concurrent = _pipeline_run(client, experiment_id, live.pid, live_start)
        dead = _pipeline_run(client, experiment_id, gone.pid, "1.000")
        reused = _pipeline_run(client, experiment_id, live.pid, "1.000")  # same pid, another process
        current = _pipeline_run(client, experiment_id, os.getpid(), process_tags()["optforge.pid_start"])
        assert sorted(close_dead_runs(experiment_id, current)) == sorted([dead, reused])
    finally:
        live.kill()
        live.wait()
    assert client.get_run(concurrent).info.status == "RUNNING"
    assert {client.get_run(r).info.status for r in (dead, reused)} == {"KILLED"}
    assert client.get_run(dead).data.tags["optforge.closed_by"] == current


def _start_of(pid: int) -> str:
    from optforge.tasks.runtime.tracking import _process_start

    start = _process_start(pid)
    assert start is not None
    return start


def test_the_lock_serialises_and_times_out_with_the_file_named(tmp_path, monkeypatch):
    lock = tmp_path / "locks" / "x.lock"
    order, held = [], threading.Event()

    def holder():
        with file_lock(lock):
            held.set()
            time.sleep(0.5)
            order.append("first")

    t = threading.Thread(target=holder)
    t.start()
    held.wait(5)
    with file_lock(lock):  # waits for the holder
        order.append("second")
    t.join()
    assert order == ["first", "second"]

    monkeypatch.setenv("OPTFORGE_LOCK_TIMEOUT_S", "0.2")
    script = f"from filelock import FileLock; import time\nwith FileLock({str(lock)!r}):\n    print('held', flush=True); time.sleep(30)"
    other = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "held"
        timeout_error = pytest.raises(TimeoutError, match=r"could not lock .*x\.lock within 0\.2 s.*OPTFORGE_LOCK_TIMEOUT_S")
        with timeout_error, file_lock(lock):
            pass
    finally:
        other.kill()
        other.wait()
