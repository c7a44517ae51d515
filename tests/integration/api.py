"""Small clients for the integration tests: Prefect's REST API, MLflow over HTTP, Ray's GCS.

Plain HTTP and subprocesses on purpose: the pytest process keeps no Prefect settings, MLflow
tracking URI or Ray connection that later tests (which use local stores) would inherit.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any


def http_json(method: str, url: str, body: Any = None, timeout: float = 10) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read() or b"null")


def http_bytes(url: str, timeout: float = 10) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


def flow_run(api: str, flow_run_id: str) -> dict:
    return http_json("GET", f"{api}/flow_runs/{flow_run_id}")


def count_flow_runs(api: str) -> int:
    return int(http_json("POST", f"{api}/flow_runs/count", {}))


def deployment_by_name(api: str, flow_name: str, deployment_name: str) -> dict | None:
    try:
        return http_json("GET", f"{api}/deployments/name/{flow_name}/{deployment_name}")
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise


def wait_for_state(api: str, flow_run_id: str, timeout: float, procs: list | None = None) -> dict:
    """Poll a flow run until it is in a final state; fail early if a process it depends on died."""
    deadline = time.monotonic() + timeout
    run = flow_run(api, flow_run_id)
    while time.monotonic() < deadline:
        run = flow_run(api, flow_run_id)
        if run["state"] and run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return run
        for proc in procs or []:
            if not proc.alive():
                raise AssertionError(f"{proc.name} exited ({proc.popen.returncode}) while run was "
                                     f"{run['state']['type']}:\n{proc.tail()}")
        time.sleep(1)
    raise AssertionError(f"flow run {flow_run_id} still {run['state']['type']} after {timeout} s")


_ACTORS = """
import json, ray
ray.init(address=%r, log_to_driver=False)
from ray._private.state import state  # the GCS actor table (dead actors included); no dashboard needed
rows = [{"class": a["ActorClassName"], "job": a["JobID"], "node": a["Address"]["NodeID"], "state": a["State"]}
        for a in state.actor_table(None).values()]
nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
print(json.dumps({"actors": rows, "nodes": nodes}))
"""


def ray_actors(address: str, env: dict) -> dict:
    """Every actor the cluster has run (class, job, node) and the alive node ids, read from the GCS."""
    out = subprocess.run([sys.executable, "-c", _ACTORS % address], env=env, capture_output=True, text=True,
                         timeout=90, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])
