"""MLflow plumbing shared by the task shells: tracking URI, child runs, params, failures.

Nothing here runs at import. The embedded default is a SQLite store in the working directory; a
team points ``MLFLOW_TRACKING_URI`` at its server instead, with no code change.
"""

from __future__ import annotations

import contextlib
import os
import socket
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow

STAGE_TAG = "optforge.stage"
ERROR_TAG = "optforge.error"
# MLflow caps a tag value at 8,000 characters (the SQL stores' column size); error texts are cut to fit.
_MAX_TAG = 5000
# MLflow samples every 10 s by default: too coarse for stages that take tens of seconds.
SYSTEM_METRICS_INTERVAL_S = 2


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` when set, else ``sqlite:///<cwd>/mlflow.db``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def configure(experiment: str) -> str:
    """Point the fluent API at the tracking store and experiment; return the experiment id.

    A new SQLite store creates its schema on first use; two runs starting together against the same
    new file would both run MLflow's migrations and one fails. The first use is serialised by a lock
    next to the database file.
    """
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        with file_lock(db.with_name(db.name + ".init.lock")):
            return mlflow.set_experiment(experiment).experiment_id
    return mlflow.set_experiment(experiment).experiment_id


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 0.1}} -> {"train.lr": 0.1}; lists become their string form."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) or v is None else str(v)
    return out


def error_tags(exc: BaseException) -> dict[str, str]:
    return {ERROR_TAG: f"{type(exc).__name__}: {exc}"[:_MAX_TAG], f"{ERROR_TAG}_type": type(exc).__name__}


@contextlib.contextmanager
def child_run(parent_run_id: str | None, stage: str, run_name: str | None = None, params: dict | None = None,
              tags: dict | None = None, system_metrics: bool = False) -> Iterator[mlflow.ActiveRun]:
    """A nested MLflow run for one stage; on error it ends FAILED with the error as a tag.

    ``system_metrics`` turns on MLflow's system metrics monitor for the run (``system/cpu_utilization_percentage``,
    memory, disk, network; GPU utilisation and memory when ``nvidia-ml-py`` is installed and a GPU is present),
    sampled every ``SYSTEM_METRICS_INTERVAL_S`` unless ``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` says otherwise.
    The training stages use it; the samples are of the machine running the driver, which for local Ray is the
    machine doing the work.
    """
    all_tags = {STAGE_TAG: stage, **(tags or {})}
    if system_metrics and not os.environ.get("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"):
        mlflow.system_metrics.set_system_metrics_sampling_interval(SYSTEM_METRICS_INTERVAL_S)
    with mlflow.start_run(run_name=run_name or stage, parent_run_id=parent_run_id, nested=True, tags=all_tags,
                          log_system_metrics=system_metrics) as run:
        try:
            if params:
                mlflow.log_params(flatten(params))
            yield run
        except BaseException as exc:
            mlflow.set_tags(error_tags(exc))
            with contextlib.suppress(Exception):  # the tag matters more; a server outage must not mask the error
                mlflow.log_text("".join(traceback.format_exception(exc)), "error/traceback.txt")
            raise


def _process_start(pid: int) -> str | None:
    """Creation time of ``pid`` (psutil: Linux, macOS, Windows), or None when no such process exists.

    With the pid it tells a live run from a dead one whose pid a new process reused.
    """
    import psutil

    try:
        return f"{psutil.Process(pid).create_time():.3f}"
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


def process_tags() -> dict[str, str]:
    """Who runs this pipeline: lets a later run recognise this one as dead if it is killed."""
    pid = os.getpid()
    return {"optforge.host": socket.gethostname(), "optforge.pid": str(pid), "optforge.pid_start": _process_start(pid) or ""}


# The flows whose parent runs a later run may find left RUNNING: optforge run's and optforge tune's.
PIPELINES = ("optimize", "tune")
TUNE_TRIAL_STAGE = "tune_trial"  # the stage tag of a tune trial's run (flows/tune_trial.py)


def pipeline_runs(client, experiment_id: str, where: str = "", max_results: int = 200) -> list:
    """Every pipeline's parent runs matching ``where`` (an MLflow filter clause, or none), newest first.

    One query per pipeline: MLflow's filter has no ``IN`` for tags.
    """
    clause = f" and {where}" if where else ""
    runs = [run for pipeline in PIPELINES for run in client.search_runs(
        [experiment_id], f"tags.`optforge.pipeline` = '{pipeline}'{clause}", max_results=max_results,
        order_by=["attributes.start_time DESC"])]
    return sorted(runs, key=lambda r: r.info.start_time or 0, reverse=True)


def descendants(client, experiment_id: str, run_id: str, status: str = "= 'RUNNING'") -> list:
    """Runs under ``run_id`` at any depth whose status matches ``status`` (an MLflow filter clause), deepest
    first: a tune trial's steps sit two levels under the tune run."""
    found = []
    for child in client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{run_id}' and "
                                    f"attributes.status {status}", max_results=1000):
        found += [*descendants(client, experiment_id, child.info.run_id, status), child]
    return found


def close_dead_runs(experiment_id: str, current_run_id: str) -> list[str]:
    """Mark pipeline runs left RUNNING by a killed process on this host KILLED, children included.

    A SIGKILL-ed run never ends its MLflow runs. A run is dead when its recorded process (same host)
    no longer exists or is another process that reused the pid. Runs of other hosts are left alone:
    from here they cannot be told apart from live ones.
    """
    client = mlflow.MlflowClient()
    host = socket.gethostname()
    running = pipeline_runs(client, experiment_id, "attributes.status = 'RUNNING'")
    closed = []
    for run in running:
        tags = run.data.tags
        if run.info.run_id == current_run_id or tags.get("optforge.host") != host or not tags.get("optforge.pid"):
            continue
        start = _process_start(int(tags["optforge.pid"]))
        if start is not None and start == tags.get("optforge.pid_start"):
            continue  # still alive: a concurrent run, not a dead one
        for r in [*descendants(client, experiment_id, run.info.run_id), run]:
            client.set_tag(r.info.run_id, "optforge.closed_by", current_run_id)
            client.set_terminated(r.info.run_id, status="KILLED")
        closed.append(run.info.run_id)
    return closed


LOCK_TIMEOUT_S = 600.0  # longer than any locked section takes; OPTFORGE_LOCK_TIMEOUT_S overrides


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (created if missing) for the duration of the block.

    ``filelock`` takes an OS lock (``flock`` on POSIX, ``msvcrt.locking`` on Windows), which the OS
    releases when the holder dies, so a killed run never leaves a stale lock behind. Waiting longer
    than ``OPTFORGE_LOCK_TIMEOUT_S`` raises an error that names the file and the setting.
    """
    from filelock import FileLock, Timeout

    timeout = float(os.environ.get("OPTFORGE_LOCK_TIMEOUT_S") or LOCK_TIMEOUT_S)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with FileLock(str(path), timeout=timeout):
            yield
    except Timeout as exc:
        raise TimeoutError(f"could not lock {path} within {timeout:g} s: another optforge run on this host holds it "
                           "(raise OPTFORGE_LOCK_TIMEOUT_S to wait longer)") from exc


@contextlib.contextmanager
def registry_lock(model_name: str) -> Iterator[None]:
    """Serialise the read-compare-set of a registered model's aliases among runs on this host.

    MLflow has no compare-and-set for aliases: two runs that both read "no champion" would both
    claim it. An exclusive lock on a file named after (tracking URI, model name) makes the decision
    one run at a time. Runs on several hosts need ``OPTFORGE_LOCK_DIR`` on a shared file system that
    supports OS file locks.
    """
    import hashlib
    import tempfile

    folder = Path(os.environ.get("OPTFORGE_LOCK_DIR") or Path(tempfile.gettempdir()) / "optforge-locks")
    key = hashlib.sha256(f"{tracking_uri()}|{model_name}".encode()).hexdigest()[:24]
    with file_lock(folder / f"registry-{key}.lock"):
        yield
