"""``optforge tune`` end to end: a real Ray Tune search on local Ray, killed with SIGKILL, then resumed.

One search of six trials over a tiny MLP serves every check (the suite's time is short): three chains,
a hopeless pruning ratio (the floor scheduler must stop it), a learning rate that makes fine-tuning
diverge (a NaN: the trial fails, the search goes on) and settings that work. The first process, a real
``optforge tune``, is killed after two trials finished; the same search then resumes in this process,
through the Python API (``optforge.tune``).
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow import MlflowClient

from optforge.flows.cli import format_tune
from optforge.tasks.stages.benchmark import TIMED
from optforge.tasks.techniques.measurement.pareto import dominates
from tests.conftest import TINY

pytestmark = pytest.mark.slow

TRIAL = "tags.`optforge.stage` = 'tune_trial'"


def _config(tmp_path: Path) -> Path:
    cfg = {**TINY, "tracking": {"experiment": "optforge-test", "workdir": str(tmp_path / "work")},
           "compress": {"chains": [], "prune": {"finetune": {"epochs": 2}}, "factorize": {"finetune": {"epochs": 1}}},
           "tune": {"trials": 6, "max_concurrent": 1,
                    "chains": [["prune", "quantize"], ["prune", "static"], ["factorize", "quantize"]],
                    "space": {"compress.prune.sparsity": [0.3, 0.95], "compress.factorize.energy": [0.8],
                              "compress.factorize.finetune.lr": [1e-3, 1e30]}}}
    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _finished_trials(client: MlflowClient, experiment_id: str) -> list:
    return client.search_runs([experiment_id], f"{TRIAL} and attributes.status = 'FINISHED'")


@pytest.fixture(scope="module")
def search(tmp_path_factory, prefect_api_url):
    """Kill a search after two finished trials, resume it; return what the checks read."""
    tmp_path = tmp_path_factory.mktemp("tune")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "OPTFORGE_LOCK_DIR": str(tmp_path / "locks"),
           "PREFECT_API_URL": prefect_api_url}
    config = _config(tmp_path)
    cmd = [str(Path(sys.executable).with_name("optforge")), "tune", "--config", str(config)]
    client = MlflowClient(uri)

    first = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and first.poll() is None:
            exp = client.get_experiment_by_name("optforge-test")
            if exp is not None and len(_finished_trials(client, exp.experiment_id)) >= 2:
                break
            time.sleep(0.5)
        assert first.poll() is None, f"the first search ended (rc={first.returncode}) before it could be killed"
        os.killpg(first.pid, signal.SIGKILL)  # the driver and the trials' Ray processes with it
        first.wait(30)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    exp = client.get_experiment_by_name("optforge-test")
    finished_before = {r.data.tags["optforge.tune.trial"] for r in _finished_trials(client, exp.experiment_id)}

    import optforge

    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "OPTFORGE_LOCK_DIR")}
    os.environ.update({k: env[k] for k in saved})
    try:
        summary = optforge.tune(config=str(config))  # the Python API resumes what the CLI started
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    parents = client.search_runs([exp.experiment_id], "tags.`optforge.pipeline` = 'tune'",
                                 order_by=["attributes.start_time ASC"])
    assert len(parents) == 2
    assert mlflow.artifacts.load_dict(f"{parents[1].info.artifact_uri}/tune_summary.json")["front"] == summary["front"]
    return client, exp.experiment_id, parents, summary, finished_before


def test_every_trial_has_an_outcome_and_finished_ones_carry_the_variant_metrics(search):
    client, _, parents, summary, _ = search
    statuses = [t["status"] for t in summary["trials"]]
    assert len(statuses) == 6 and set(statuses) <= {"done", "stopped", "failed"}
    done = [t for t in summary["trials"] if t["status"] == "done"]
    assert len(done) == 3  # pruning 0.3 twice (dynamic and static INT8), factorizing at a sane learning rate
    for t in done:
        run = client.get_run(t["mlflow_run_id"])
        assert run.data.tags["mlflow.parentRunId"] in {p.info.run_id for p in parents}
        assert run.data.tags["optforge.stage"] == "tune_trial"
        assert set(TIMED) | {"params"} <= set(run.data.metrics)
        assert run.data.metrics["accuracy"] == pytest.approx(t["metrics"]["accuracy"])
        assert run.data.params["chain"] == t["chain"]
    assert f"Pareto front: {', '.join(summary['front'])}" in format_tune(summary)


def test_trials_that_share_a_prefix_build_it_once(search):
    client, _, _, summary, _ = search
    pruned = [client.get_run(t["mlflow_run_id"]) for t in summary["trials"]
              if t["status"] == "done" and t["chain"].startswith("prune")]
    assert len(pruned) == 2  # the same pruning at 0.3, then dynamic or static INT8
    assert sorted(r.data.tags["optforge.stage.prune.cached"] for r in pruned) == ["false", "true"]


def test_the_floor_scheduler_stops_the_hopeless_pruning(search, prefect_api_url):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    client, _, _, summary, _ = search
    stopped = [t for t in summary["trials"] if t["status"] == "stopped"]
    assert stopped and all(t["values"]["compress.prune.sparsity"] == 0.95 for t in stopped)
    for t in stopped:
        assert "below the floor" in t["reason"]
        run = client.get_run(t["mlflow_run_id"])
        assert run.info.status == "KILLED" and "optforge.error" not in run.data.tags
        # Its Prefect flow run says the same (Ray Tune's SystemExit had left it Crashed, or Running).
        with temporary_settings({PREFECT_API_URL: prefect_api_url}), get_client(sync_client=True) as prefect:
            state = prefect.read_flow_run(run.data.tags["prefect.flow_run_id"]).state
        assert state.is_cancelled() and "below the floor" in state.message


def test_a_failing_trial_is_recorded_and_the_search_goes_on(search):
    client, exp_id, _, summary, _ = search
    failed = [t for t in summary["trials"] if t["status"] == "failed"]
    assert len(failed) == 1 and failed[0]["values"]["compress.factorize.finetune.lr"] == 1e30
    assert "FloatingPointError: loss became non-finite" in failed[0]["error"]
    runs = client.search_runs([exp_id], f"{TRIAL} and attributes.status = 'FAILED'")
    assert {r.data.tags["optforge.tune.trial"] for r in runs} >= {str(t["index"]) for t in failed}
    assert any(t["status"] == "done" for t in summary["trials"])


def test_the_front_is_non_dominated_and_the_best_of_it_is_registered(search):
    client, _, _, summary, _ = search
    latency = "latency_ms_p50_b1"
    points = {t["trial"]: t["metrics"] for t in summary["trials"] if t["status"] == "done"}
    points[summary["baseline"]["name"]] = summary["baseline"]
    front = summary["front"]
    assert front
    for name in front:
        assert not any(dominates(points[o], points[name], latency) for o in points if o != name)
    for name in set(points) - set(front):
        assert any(dominates(points[o], points[name], latency) for o in front)
    chosen = summary["registration"]["variant"]
    assert chosen in front
    version = client.get_model_version_by_alias("optforge-test", "champion")
    assert str(version.version) == summary["registration"]["version"]


def test_the_resumed_search_does_not_repeat_finished_trials(search):
    client, exp_id, parents, summary, finished_before = search
    assert summary["resumed"] is True
    assert parents[1].data.tags["optforge.tune.resumed"] == "true"
    assert finished_before, "no trial had finished when the first search was killed"
    finished = _finished_trials(client, exp_id)
    ids = [r.data.tags["optforge.tune.trial"] for r in finished]
    assert len(ids) == len(set(ids))  # no trial was built and timed twice
    assert finished_before <= set(ids)
    assert parents[0].info.status == "KILLED"  # the second run closed the killed one's runs
