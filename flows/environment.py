"""The laptop defaults every optforge command puts in the environment before importing Prefect or MLflow."""

from __future__ import annotations

import os
from pathlib import Path


def embedded_defaults() -> None:
    """Laptop defaults; any variable the user set wins (that is how a team points at its servers)."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # the network is closed; avoid its error
    os.environ.setdefault("PREFECT_RESULTS_LOCAL_STORAGE_PATH", str(Path(".optforge/prefect-results").resolve()))
    os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    # MLflow's HTTP client retries 7 times with doubling back-off (minutes of silence when a server is
    # down). 3 retries, 1-2-4 s apart, 10 s timeout; the stage tasks' own retries come on top.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
