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

import sys  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _stop_ray_at_the_end():
    """Tests that train start a local Ray in this process; stop it when the session ends."""
    yield
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        sys.modules["ray"].shutdown()


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
