"""Real servers on loopback for the integration tier: MLflow, Prefect and a two-node Ray cluster.

One ``stack`` per test package (started once, stopped after the package's last test): an
``mlflow server`` (SQLite backend, artifacts proxied to a local folder), a ``prefect server
start`` (SQLite, its own PREFECT_HOME) and ``ray start --head`` plus a second ``ray start
--address``, each node with one CPU, so Ray Train's two workers must use both nodes. Every
process is started in its own process group with a free port on 127.0.0.1 and is stopped here:
SIGTERM to the group, SIGKILL after a grace period, then any process still carrying this
stack's unique folder on its command line (Ray's worker processes) is killed by pid.
Never ``ray stop``: it would stop other people's Ray on this shared machine.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from tests.conftest import TINY, free_port

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
STARTUP_TIMEOUT_S = 120  # the servers start in ~15 s alone; the 2 cores here are shared
STOP_GRACE_S = 5


@dataclass
class Proc:
    """A server process in its own process group, with its output in a log file."""

    name: str
    popen: subprocess.Popen
    log: Path

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, sig)

    def stop(self, grace: float = STOP_GRACE_S) -> None:
        stop_all([self], grace)


def stop_all(procs: list[Proc], grace: float = STOP_GRACE_S) -> None:
    """SIGTERM every group at once, wait up to ``grace`` s, then SIGKILL the groups (stragglers too)."""
    for proc in procs:
        proc.signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.popen.wait(max(deadline - time.monotonic(), 0.1))
    for proc in procs:
        proc.signal(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.popen.wait(5)


def start(name: str, argv: list[str], env: dict, logs: Path, cwd: Path) -> Proc:
    log = logs / f"{name}.log"
    with open(log, "wb") as out:
        popen = subprocess.Popen(argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 start_new_session=True)
    return Proc(name, popen, log)


def wait_until(ready, proc: Proc, what: str, timeout: float = STARTUP_TIMEOUT_S) -> None:
    """Poll ``ready()`` until true; fail with the process's log if it exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited ({proc.popen.returncode}) before {what}:\n{proc.tail()}")
        with contextlib.suppress(Exception):
            if ready():
                return
        time.sleep(0.5)
    raise TimeoutError(f"{proc.name}: no {what} after {timeout} s:\n{proc.tail()}")


def http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as r:
        return r.status == 200


def kill_marked(marker: str) -> list[int]:
    """SIGKILL this user's processes whose command line contains ``marker`` (a folder unique to us)."""
    killed = []
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit() or int(pid_dir.name) == os.getpid():
            continue
        try:
            cmdline = (pid_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if marker in cmdline and pid_dir.stat().st_uid == os.getuid():
                os.kill(int(pid_dir.name), signal.SIGKILL)
                killed.append(int(pid_dir.name))
        except (OSError, ValueError):
            continue
    return killed


@dataclass
class Stack:
    """Addresses of the running servers and the environment a client process needs to use them."""

    root: Path
    mlflow_url: str
    prefect_api_url: str
    ray_address: str
    ray_temp_dir: Path
    artifacts_dir: Path
    config: Path
    experiment: str
    env: dict[str, str] = field(default_factory=dict)
    procs: dict[str, Proc] = field(default_factory=dict)

    def client_env(self, **extra: str) -> dict[str, str]:
        return {**self.env, **extra}


def _base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "RAY_ADDRESS")}
    # RAY_AUTH_MODE: an earlier in-process ray.init of this test session sets RAY_AUTH_MODE=token in
    # os.environ; clients that inherited it could not talk to the stack's cluster (auth off, below).
    env.update(PREFECT_SERVER_ANALYTICS_ENABLED="false", RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1",
               RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS="0", RAY_AUTH_MODE="disabled")
    return env


def _start_ray(base: dict, temp_dir: Path, logs: Path) -> tuple[str, list[Proc]]:
    """Head then worker node, one CPU each, ports picked here so two nodes on one host do not collide."""
    # Token auth off: ray start enables it when ~/.ray/auth_token exists (any earlier local
    # ray.init writes one), and then every client would need RAY_AUTH_MODE=token too. Loopback only.
    env = {**base, "RAY_AUTH_MODE": "disabled"}
    gcs_port = free_port()
    common = ["--num-cpus", "1", "--node-ip-address", "127.0.0.1", "--temp-dir", str(temp_dir), "--block",
              "--disable-usage-stats", "--object-store-memory", str(100 * 1024**2)]  # 100 MB each: tiny data

    def node_ports():
        return ["--dashboard-agent-listen-port", str(free_port()), "--metrics-export-port", str(free_port()),
                "--runtime-env-agent-port", str(free_port())]

    head = start("ray-head", [str(BIN / "ray"), "start", "--head", "--port", str(gcs_port), "--include-dashboard",
                              "false", *node_ports(), *common], env, logs, temp_dir)
    wait_until(lambda: socket.create_connection(("127.0.0.1", gcs_port), 1).close() is None, head, "GCS port")
    worker = start("ray-worker", [str(BIN / "ray"), "start", "--address", f"127.0.0.1:{gcs_port}", *node_ports(),
                                  *common], env, logs, temp_dir)
    return f"127.0.0.1:{gcs_port}", [head, worker]


def ray_started(proc: Proc) -> bool:
    """``ray start`` logs this line once its node has registered with the head."""
    return "Ray runtime started." in proc.tail(100_000)


# The integration config: the tests' tiny pipeline without the extra engine and compression
# variants (each costs CPU time and proves nothing more about where the work runs).
STACK_CONFIG = {
    **TINY,
    "onnx": {"static": {"enabled": False}, "fp16": {"enabled": False}},
    "engines": {"tensorrt": {"enabled": False}, "torch_gpu": {"enabled": False}},
    "compress": {"chains": []},
}


@pytest.fixture(scope="package")
def stack(tmp_path_factory):
    """MLflow + Prefect + two-node Ray on 127.0.0.1, with a tiny config whose workdir both nodes share."""
    root = tmp_path_factory.mktemp("stack")
    logs = root / "logs"
    logs.mkdir()
    # Ray puts Unix sockets under its temp dir: keep the path short (sockets allow 107 bytes).
    ray_tmp = Path(tempfile.mkdtemp(prefix="oforge-ray-", dir="/tmp"))
    base = _base_env()
    procs: dict[str, Proc] = {}
    try:
        mlflow_port, prefect_port = free_port(), free_port()
        artifacts = root / "mlflow-artifacts"
        procs["mlflow"] = start("mlflow", [
            str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow_port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
            "--serve-artifacts", "--artifacts-destination", str(artifacts),
        ], base, logs, root)
        server_env = {**base, "PREFECT_HOME": str(root / "prefect-server"), "PREFECT_UI_ENABLED": "false",
                      # No scheduler service: the tests trigger runs by hand, and a cron run falling due
                      # during the test must not start the (slow) default config. Schedules are still stored.
                      "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false"}
        procs["prefect"] = start("prefect", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                                             "--port", str(prefect_port), "--no-ui"], server_env, logs, root)
        ray_address, (head, worker) = _start_ray(base, ray_tmp, logs)
        procs["ray-worker"], procs["ray-head"] = worker, head

        mlflow_url = f"http://127.0.0.1:{mlflow_port}"
        prefect_api = f"http://127.0.0.1:{prefect_port}/api"
        wait_until(lambda: http_ok(f"{mlflow_url}/health"), procs["mlflow"], "/health")
        wait_until(lambda: http_ok(f"{prefect_api}/health"), procs["prefect"], "/api/health")
        wait_until(lambda: ray_started(head) and ray_started(worker), worker, "'Ray runtime started.' on both nodes")

        experiment = "optforge-it"
        config = root / "tiny.yaml"
        tracking = {"experiment": experiment, "workdir": str(root / "work")}
        config.write_text(yaml.safe_dump({**STACK_CONFIG, "tracking": tracking}))
        env = {**base, "MLFLOW_TRACKING_URI": mlflow_url, "PREFECT_API_URL": prefect_api, "RAY_ADDRESS": ray_address,
               "PREFECT_HOME": str(root / "prefect-client"),
               # One result store for every flow run here (CLI, worker, serve): stage caches are shared,
               # as they are on a team's shared storage.
               "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(root / "prefect-results")}
        yield Stack(root, mlflow_url, prefect_api, ray_address, ray_tmp, artifacts, config, experiment, env, procs)
    finally:
        stop_all(list(procs.values()))
        kill_marked(str(ray_tmp))
        kill_marked(str(root))
        shutil.rmtree(ray_tmp, ignore_errors=True)  # sessions, sockets and logs: megabytes per run


@pytest.fixture
def spawn(stack):
    """Start extra long-running processes (a worker, ``optforge serve``) that are stopped after the test."""
    started: list[Proc] = []

    def _spawn(name: str, argv: list[str], env: dict | None = None, cwd: Path | None = None) -> Proc:
        proc = start(name, argv, env or stack.env, stack.root / "logs", cwd or stack.root)
        started.append(proc)
        return proc

    yield _spawn
    stop_all(started)
