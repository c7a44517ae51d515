"""MLflow plumbing shared by the task shells: tracking URI, child runs, params, failures.

Nothing here runs at import. The embedded default is a SQLite store in the working directory; a
team points ``MLFLOW_TRACKING_URI`` at its server instead, with no code change.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator

import mlflow

STAGE_TAG = "optforge.stage"
ERROR_TAG = "optforge.error"
# MLflow caps a tag value at 8,000 characters (the SQL stores' column size); error texts are cut to fit.
_MAX_TAG = 5000


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` when set, else ``sqlite:///<cwd>/mlflow.db``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def configure(experiment: str) -> str:
    """Point the fluent API at the tracking store and experiment; return the experiment id."""
    mlflow.set_tracking_uri(tracking_uri())
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
              tags: dict | None = None) -> Iterator[mlflow.ActiveRun]:
    """A nested MLflow run for one stage; on error it ends FAILED with the error as a tag."""
    all_tags = {STAGE_TAG: stage, **(tags or {})}
    with mlflow.start_run(run_name=run_name or stage, parent_run_id=parent_run_id, nested=True, tags=all_tags) as run:
        try:
            if params:
                mlflow.log_params(flatten(params))
            yield run
        except BaseException as exc:
            mlflow.set_tags(error_tags(exc))
            raise
