"""Scheduled deployments on a real Prefect server: ``deployments/prefect.yaml`` run by a process
worker, and ``optforge serve``; each run is triggered with ``prefect deployment run``.

Both runs use the stack's tiny config and share its result store and work folder, so after
``test_cli_on_stack`` their stages come from the cache (as on a team's shared storage); run alone,
they train on the Ray cluster instead. Either way they must end Completed with their MLflow run.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from optforge.flows.serve_cmd import DEFAULT_CRON
from tests.integration.api import count_flow_runs, deployment_by_name, wait_for_state
from tests.integration.conftest import ROOT, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BIN = Path(sys.executable).parent
PREFECT_YAML = ROOT / "deployments" / "prefect.yaml"
RUN_TIMEOUT_S = 400


# prefect 3.8.8's `prefect deploy`, after creating the deployment, asks the server for the pool's
# workers with an explicit JSON null `limit`; FastAPI >= 0.151 answers 422 (0.150 takes the default),
# so the command exits 1 though the deployment exists. The fix is pinning fastapi<0.151.


def prefect(stack, *args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 120) -> str:
    proc = subprocess.run([str(BIN / "prefect"), "--no-prompt", *args], cwd=cwd or stack.root, env=env or stack.env,
                          capture_output=True, text=True, timeout=timeout, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"prefect {' '.join(args)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return output


def trigger(stack, name: str, experiment: str, typed: bool = False) -> str:
    """``prefect deployment run`` with the tiny config (a path, or with ``typed`` its content as the typed
    ``config`` parameter); returns the new flow run's id."""
    config = {"config": yaml.safe_load(stack.config.read_text())} if typed else {"config_path": str(stack.config)}
    params = {**config, "overrides": [f"tracking.experiment={experiment}"]}
    out = prefect(stack, "deployment", "run", name, "--params", json.dumps(params))
    match = re.search(r"UUID:\s*([0-9a-f-]{36})", out)
    assert match, out
    return match.group(1)


def assert_tracked(stack, flow_run_id: str, experiment: str) -> None:
    """The run's MLflow parent run is on the server, FINISHED, and points back at the flow run."""
    mlflow = MlflowClient(stack.mlflow_url)
    exp = mlflow.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment}"
    (parent,) = mlflow.search_runs([exp.experiment_id], f"tags.`prefect.flow_run_id` = '{flow_run_id}'")
    assert parent.info.status == "FINISHED"
    assert parent.info.artifact_uri.startswith("mlflow-artifacts:/")
    local = mlflow.download_artifacts(parent.info.run_id, "summary.json", str(stack.root / f"dl-{flow_run_id}"))
    summary = json.loads(Path(local).read_text())
    assert {s["stage"] for s in summary["stages"]} >= {"prepare_data", "train", "benchmark", "register"}


def test_prefect_yaml_deployment_runs_on_a_process_worker(stack, spawn):
    litter = [".optforge", "mlflow.db", "mlruns", "mlartifacts", ".prefect"]  # what a misrouted run would leave
    before = {name for name in litter if (ROOT / name).exists()}
    prefect(stack, "work-pool", "create", "optforge-process", "--type", "process")
    # Deployed from the repository root, exactly as infra/README.md says.
    prefect(stack, "deploy", "--prefect-file", str(PREFECT_YAML), "--all", cwd=ROOT, timeout=180)
    deployment = deployment_by_name(stack.prefect_api_url, "optimize", "optforge-nightly")
    assert deployment["entrypoint"] == "flows/optimize.py:optimize"
    assert deployment["work_pool_name"] == "optforge-process"
    assert deployment["parameters"] == {"config": {"train": {"epochs": 20}, "register": {"max_accuracy_drop": 1.0}},
                                        "overrides": [], "force": False}
    assert deployment["enforce_parameter_schema"] is True
    # The run form's schema: every section's fields with defaults and descriptions.
    lr = deployment["parameter_openapi_schema"]["definitions"]["TrainConfig"]["properties"]["lr"]
    assert lr["default"] == 0.001 and lr["exclusiveMinimum"] == 0 and lr["description"]
    runs_before = count_flow_runs(stack.prefect_api_url)
    bad = {"config": {"train": {"lr": -1}}}  # rejected by the server: no flow run is created, no stage runs
    proc = subprocess.run([str(BIN / "prefect"), "--no-prompt", "deployment", "run", "optimize/optforge-nightly",
                           "--params", json.dumps(bad)], cwd=stack.root, env=stack.env, capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode != 0 and "lr" in proc.stdout + proc.stderr, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert count_flow_runs(stack.prefect_api_url) == runs_before
    (schedule,) = deployment["schedules"]
    assert schedule["schedule"]["cron"] == "0 2 * * *" and schedule["schedule"]["timezone"] == "UTC"
    assert deployment["pull_steps"][0]["prefect.deployments.steps.set_working_directory"]["directory"] == \
        "{{ $OPTFORGE_HOME }}"  # resolved by each worker when a run starts

    flow_run_id = trigger(stack, "optimize/optforge-nightly", "optforge-it-deployment", typed=True)
    worker = spawn("prefect-worker", [str(BIN / "prefect"), "worker", "start", "--pool", "optforge-process",
                                      "--run-once", "--limit", "1"],
                   env=stack.client_env(OPTFORGE_HOME=str(ROOT)))
    run = wait_for_state(stack.prefect_api_url, flow_run_id, RUN_TIMEOUT_S)
    assert run["state"]["type"] == "COMPLETED", f"{run['state']}\n{worker.tail()}"
    assert_tracked(stack, flow_run_id, "optforge-it-deployment")
    worker.popen.wait(60)  # --run-once: the worker exits after its run
    assert worker.popen.returncode == 0, worker.tail()
    assert {name for name in litter if (ROOT / name).exists()} == before  # nothing written into the checkout


def test_optforge_serve_serves_a_scheduled_deployment(stack, spawn):
    name = "optforge-serve-it"
    serve = spawn("optforge-serve", [sys.executable, "-m", "optforge.flows.serve_cmd", "--name", name,
                                     "--config", str(stack.config), "--timezone", "Europe/Berlin"])
    wait_until(lambda: deployment_by_name(stack.prefect_api_url, "optimize", name) is not None, serve,
               "deployment registered")
    deployment = deployment_by_name(stack.prefect_api_url, "optimize", name)
    (schedule,) = deployment["schedules"]
    assert schedule["schedule"]["cron"] == DEFAULT_CRON and schedule["schedule"]["timezone"] == "Europe/Berlin"
    assert deployment["parameters"]["config_path"] == str(stack.config)

    flow_run_id = trigger(stack, f"optimize/{name}", "optforge-it-serve")
    run = wait_for_state(stack.prefect_api_url, flow_run_id, RUN_TIMEOUT_S, procs=[serve])
    assert run["state"]["type"] == "COMPLETED", f"{run['state']}\n{serve.tail()}"
    assert_tracked(stack, flow_run_id, "optforge-it-serve")


def test_optforge_has_the_serve_command():
    """``optforge serve`` is wired into the CLI (flows/cli.py registers flows/serve_cmd.py's parser)."""
    from optforge.flows.cli import build_parser
    from optforge.flows.serve_cmd import cmd_serve

    args = build_parser().parse_args(["serve", "--cron", "*/30 * * * *", "--set", "train.epochs=2"])
    assert args.func is cmd_serve and args.cron == "*/30 * * * *" and args.set == ["train.epochs=2"]
