"""Test-session isolation: Prefect, MLflow and Ray state go to a temporary folder, never ~/.

Set before anything imports prefect, because Prefect reads its settings at import.
"""

import os
import tempfile

_HOME = tempfile.mkdtemp(prefix="optforge-tests-")
os.environ.setdefault("PREFECT_HOME", os.path.join(_HOME, "prefect"))
os.environ.setdefault("PREFECT_RESULTS_LOCAL_STORAGE_PATH", os.path.join(_HOME, "prefect", "storage"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("RAY_ADDRESS", None)
os.environ.pop("PREFECT_API_URL", None)

import random
import socket
import sys
import threading
import warnings
from pathlib import Path

import pytest

_HANDED_OUT: set[int] = set()
RAY_WORKER_PORTS = range(10002, 20000)  # ray start's default --min/--max-worker-port


def _ephemeral_range() -> tuple[int, int]:
    """The ports the kernel hands to outgoing connections and ``bind(port=0)`` (32768-60999 by default)."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[:2])
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on now and that nothing else will be handed meanwhile.

    Not the kernel's ``bind(port=0)`` choice: that comes from the ephemeral range, where any outgoing
    connection (Ray's dozens, a Prefect client's) may take the port in the seconds before a slow server
    (mlflow: ~10 s) binds it, and the server then exits with EADDRINUSE (seen in CI). Ports above Ray's
    worker range and outside the ephemeral range are only ever taken by an explicit bind; this session
    never hands out the same one twice. A host whose ephemeral range leaves no such port gets the
    kernel's choice.
    """
    low, high = _ephemeral_range()
    candidates = [*range(RAY_WORKER_PORTS.stop, low), *range(max(high + 1, RAY_WORKER_PORTS.stop), 65536)]
    rng = random.Random()
    for _ in range(200 if candidates else 0):
        port = rng.choice(candidates)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop_ray(grace_s: float = 60.0) -> None:
    """Stop the local Ray that training started in this process, if any.

    ``ray.shutdown`` can hang closing its GCS subscriber when that connection broke while Ray sat idle
    (ray-project/ray#44836; seen in CI after minutes of Ray-free tests: GOAWAY "too_many_pings", then
    a teardown stuck until pytest-timeout). So it runs in a thread; if it has not returned after
    ``grace_s``, this session's Ray processes are killed, which ends the stuck call.
    """
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return
    stopper = threading.Thread(target=ray.shutdown, name="ray-shutdown", daemon=True)
    stopper.start()
    stopper.join(grace_s)
    if stopper.is_alive():
        node = ray._private.worker._global_node  # private, but the only handle on the processes it started
        if node is not None:
            node.kill_all_processes(check_alive=False, allow_graceful=False)
        stopper.join(30)
        warnings.warn(f"ray.shutdown hung for {grace_s:.0f} s; killed this session's Ray processes "
                      f"({'done' if not stopper.is_alive() else 'still stuck'})", stacklevel=1)


@pytest.fixture(scope="module", autouse=True)
def _stop_ray_after_each_module():
    """Tests that train start a local Ray in this process. Stop it after the module that started it,
    so it never sits idle through the rest of the session (the next module starts a fresh one)."""
    yield
    _stop_ray()


@pytest.fixture(scope="session")
def prefect_api_url():
    """This session's Prefect server: Prefect's own temporary one, the one this process's flows use.

    A pipeline run in a subprocess given it as ``PREFECT_API_URL`` skips starting a temporary server of its
    own (11-14 s on 2 cores, per process). Tests about a user's first run on a bare machine do not use it.
    """
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # the singleton Prefect's clients use in this process
    # Prefect's default 20 s is too short when the 2 cores are busy (pip, Ray, a previous test's teardown), and
    # pytest keeps a session fixture's error: every later test that needs the server would error with it.
    try:
        server.start(timeout=120)
    except BaseException:
        server.stop()  # a server that missed the deadline is still starting: never leave it behind
        raise
    yield server.api_url
    # Stopped here, not by Prefect's atexit hook: that one logs through a handler whose stream pytest has
    # closed by then ("--- Logging error --- ValueError: I/O operation on closed file" after the summary).
    # Logs and events still queued go first, as in Prefect's own prefect_test_harness.
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)
    EventsWorker.drain_all(timeout=10)
    server.stop()


TINY = {
    "train": {"epochs": 4, "batch_size": 32, "lr": 0.01, "patience": 0, "num_workers": 2},
    "model": {"hidden": [64]},
    "benchmark": {"warmup": 3, "iters_b1": 30, "iters_batch": 3},
    "register": {"model_name": "optforge-test", "max_accuracy_drop": 2.0},
    "compress": {"chains": []},  # chains have their own end-to-end test (tests/flows/test_chains.py)
}


@pytest.fixture
def tiny_config(tmp_path):
    """A config that runs the whole pipeline in well under a minute, with its own work folder."""
    import yaml

    cfg = {**TINY, "tracking": {"experiment": "optforge-test", "workdir": str(tmp_path / "work")}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="session")
def _mlflow_template(tmp_path_factory):
    """An MLflow SQLite file with its schema made once: creating it costs seconds, copying it milliseconds."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def mlflow_store(_mlflow_template, tmp_path, monkeypatch):
    """A real MLflow SQLite store in the test's folder, selected the way users do it (environment)."""
    import shutil

    import mlflow

    shutil.copy(_mlflow_template, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(uri)
    yield uri
    if mlflow.active_run():
        mlflow.end_run()
