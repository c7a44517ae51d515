"""Two real pipeline processes at once against one MLflow store and one registered model name."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from tests.conftest import TINY

pytestmark = pytest.mark.slow


def _config(tmp_path: Path, name: str, model: dict, epochs: int) -> Path:
    # Ranked by size, not latency: two pipelines timing at once on 2 cores must not decide the champion.
    cfg = {**TINY, "model": model, "train": {**TINY["train"], "epochs": epochs},
           "register": {**TINY.get("register", {}), "rank_by": "size_mb"},
           "tracking": {"experiment": "optforge-test", "workdir": str(tmp_path / name)}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_two_runs_at_once_end_with_the_better_champion(tmp_path, prefect_api_url):
    # "small" is smaller and at least as accurate: whichever run registers first, it must end champion.
    configs = {"big": _config(tmp_path, "big", {"hidden": [1024, 1024]}, epochs=1),
               "small": _config(tmp_path, "small", {"hidden": [64]}, epochs=5)}
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "PREFECT_API_URL": prefect_api_url,
           "OPTFORGE_LOCK_DIR": str(tmp_path / "locks")}
    exe = str(Path(sys.executable).with_name("optforge"))
    procs = {name: subprocess.Popen([exe, "run", "--config", str(path)], env=env, cwd=tmp_path, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for name, path in configs.items()}
    outputs = {name: proc.communicate(timeout=540)[0] for name, proc in procs.items()}
    for name, proc in procs.items():
        assert proc.returncode == 0, f"{name}:\n{outputs[name][-3000:]}"

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("optforge-test")
    parents = {r.data.tags["optforge.config_path"]: r
               for r in client.search_runs([exp.experiment_id], "tags.`optforge.pipeline` = 'optimize'")}
    assert {Path(p).stem for p in parents} == {"big", "small"}
    for parent in parents.values():
        assert parent.info.status == "FINISHED"
        children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
        assert {c.data.tags["optforge.stage"] for c in children} >= {"train", "benchmark", "register"}
        assert all(c.info.status == "FINISHED" for c in children)

    versions = client.search_model_versions("name = 'optforge-test'")
    assert len(versions) == 2
    champion = client.get_model_version_by_alias("optforge-test", "champion")
    assert champion.tags["pipeline_run"] == parents[str(configs["small"])].info.run_id
