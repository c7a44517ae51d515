"""The default config runs to a registered model on inputs it was not tuned for: a 178-row .npz (fewer
training rows than static INT8's default calibration asks for) with a user factory model (which
structured pruning cannot take). Only the work folder differs from the defaults."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from optforge.flows.cli import main

pytestmark = pytest.mark.slow


def test_small_npz_and_a_factory_run_with_the_default_config(tmp_path, mlflow_store, monkeypatch):
    from sklearn.datasets import load_digits

    from tests.conftest import _stop_ray

    _stop_ray()  # the factory must import on the Ray workers: a fresh local Ray inherits PYTHONPATH
    monkeypatch.setenv("PYTHONPATH", str(__import__("pathlib").Path(__file__).resolve().parents[2]))
    digits = load_digits()
    np.savez(tmp_path / "small.npz", X=digits.data[:178] / 16.0, y=digits.target[:178])
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"tracking": {"workdir": str(tmp_path / "work")}}))
    code = main(["run", "--config", str(cfg), "--set", f"data.source={tmp_path / 'small.npz'}",
                 "--set", "model.arch=tests.flows.byo_models:table_net"])
    assert code == 0
    import mlflow
    from mlflow import MlflowClient

    run = mlflow.search_runs(experiment_names=["optforge"], filter_string="tags.`optforge.pipeline` = 'optimize'",
                             output_format="list")[0]
    tags = run.data.tags
    name = "optforge-small-table_net"  # from the data and the model: not the digits model's name
    assert tags["optforge.registry_name"] == name
    assert MlflowClient().get_model_version_by_alias(name, "champion")
    assert "optforge.skipped.prune" not in tags  # structured pruning applies to a factory model too
    static = mlflow.search_runs(experiment_names=["optforge"], filter_string="tags.mlflow.runName = 'static'",
                                output_format="list")[0]
    assert static.data.tags["optforge.scaled.calibration_samples"].startswith("256 -> 124")
