"""Bad server addresses fail fast, naming the variable and the address (flows/preflight.py).

Three kinds of wrong address, all on 127.0.0.1: a closed port (connection refused), a port that
accepts connections but never answers (the case that otherwise hangs), and the wrong kind of server.
"""

import http.server
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from optforge.flows.preflight import PreflightError, check_environment, check_mlflow, check_prefect, check_ray
from tests.conftest import free_port

pytestmark = pytest.mark.integration

CLI_LIMIT_S = 30  # the bound for a bad address to fail


@pytest.fixture
def closed_port():
    return free_port()


@pytest.fixture
def silent_port():
    """Accepts TCP connections (the kernel's backlog) and never says a word."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield sock.getsockname()[1]


@pytest.fixture
def http1_port():
    """A plain HTTP/1.1 file server: not MLflow, not Prefect, not Ray."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), QuietHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()
    thread.join(5)


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def log_error(self, *args):
        pass


def _problems(env, timeout=2.0) -> list[str]:
    with pytest.raises(PreflightError) as info:
        check_environment(env, timeout=timeout)
    assert str(info.value).startswith("cannot reach the servers this run is configured to use:")
    return info.value.problems


def test_closed_ports_fail_at_once_naming_each_variable(closed_port):
    env = {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{closed_port}",
           "PREFECT_API_URL": f"http://127.0.0.1:{closed_port}/api", "RAY_ADDRESS": f"127.0.0.1:{closed_port}"}
    start = time.monotonic()
    problems = _problems(env)
    assert time.monotonic() - start < 2
    here = f"127.0.0.1:{closed_port}"
    assert problems == [
        f"MLFLOW_TRACKING_URI=http://{here}: no MLflow server answers: GET http://{here}/health: connection refused",
        f"PREFECT_API_URL=http://{here}/api: no Prefect API answers: GET http://{here}/api/health: connection refused",
        f"RAY_ADDRESS={here}: no Ray head (GCS) answers at {here}: connection refused",
    ]


def test_silent_servers_time_out_instead_of_hanging(silent_port):
    env = {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{silent_port}",
           "PREFECT_API_URL": f"http://127.0.0.1:{silent_port}/api", "RAY_ADDRESS": f"ray://127.0.0.1:{silent_port}"}
    start = time.monotonic()
    problems = _problems(env, timeout=2.0)
    assert time.monotonic() - start < 4  # the three checks wait in parallel
    assert len(problems) == 3 and all("no answer (timed out)" in p for p in problems)
    assert problems[2].startswith(f"RAY_ADDRESS=ray://127.0.0.1:{silent_port}: no Ray Client server answers")


def test_the_wrong_kind_of_server_is_named(http1_port):
    assert "HTTP 404" in check_mlflow(f"http://127.0.0.1:{http1_port}/mlflow", 2)
    problem = check_prefect(f"http://127.0.0.1:{http1_port}", 2)  # forgot the /api suffix
    assert problem.startswith(f"PREFECT_API_URL=http://127.0.0.1:{http1_port}:") and "ends in /api" in problem
    problem = check_ray(f"127.0.0.1:{http1_port}", 2)
    assert "does not speak gRPC" in problem
    assert "dashboard / Jobs API URL" in check_ray(f"http://127.0.0.1:{http1_port}")
    assert "expected host:port" in check_ray("no-port-here")


def test_local_settings_need_no_server():
    check_environment({"MLFLOW_TRACKING_URI": "sqlite:///mlflow.db"}, timeout=0.5)
    check_environment({"RAY_ADDRESS": "local", "PREFECT_API_URL": ""}, timeout=0.5)
    assert check_mlflow(None) is None and check_prefect(None) is None and check_ray(None) is None


def _optforge_env(tmp_path, **servers) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "RAY_ADDRESS")}
    return {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", **servers}


@pytest.mark.parametrize("variable", ["MLFLOW_TRACKING_URI", "PREFECT_API_URL", "RAY_ADDRESS"])
def test_optforge_run_stops_within_30_s_naming_the_variable(variable, silent_port, closed_port, tiny_config, tmp_path):
    """Through the console script: exit 1, one line naming the variable and address, no traceback."""
    address = {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{silent_port}",  # the hanging kind
               "PREFECT_API_URL": f"http://127.0.0.1:{closed_port}/api",
               "RAY_ADDRESS": f"127.0.0.1:{closed_port}"}[variable]
    exe = Path(sys.executable).with_name("optforge")
    start = time.monotonic()
    env = _optforge_env(tmp_path, **{variable: address})
    try:
        proc = subprocess.run([str(exe), "run", "--config", str(tiny_config)], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=2 * CLI_LIMIT_S, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail(f"`optforge run` with {variable}={address} still running after {2 * CLI_LIMIT_S} s "
                    "(does flows/cli.py call flows.preflight.check_environment before the flow?)")
    elapsed = time.monotonic() - start
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert f"{variable}={address}" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert elapsed < CLI_LIMIT_S, f"took {elapsed:.1f} s"


def test_serve_refuses_without_a_prefect_server(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "optforge.flows.serve_cmd"], env=_optforge_env(tmp_path), cwd=tmp_path,
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 1
    assert "PREFECT_API_URL is not set" in proc.stderr
