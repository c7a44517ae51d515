"""Bad input through the CLI: a message naming the field or file, a non-zero exit, a FAILED MLflow
run with the error recorded, and nothing registered."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from optforge.flows.cli import main

ROOT = Path(__file__).resolve().parents[2]


def _csv_without_label(tmp_path):
    path = tmp_path / "nolabel.csv"
    pd.DataFrame({"a": [0.1, 0.2, 0.3, 0.4], "b": [1, 0, 1, 0]}).to_csv(path, index=False)
    return ["--set", f"data.source={path}"]


def _npz(tmp_path, name, **arrays):
    path = tmp_path / f"{name}.npz"
    if arrays:
        np.savez(path, **arrays)
    else:
        path.write_bytes(b"PK\x03\x04 truncated zip")
    return ["--set", f"data.source={path}"]


CASES = {
    "corrupt npz": (lambda tmp: _npz(tmp, "corrupt"), "is not a readable .npz file"),
    "nan features": (lambda tmp: _npz(tmp, "nan", X=np.array([[np.nan, 1.0]] * 20), y=np.arange(20) % 2), "NaN or infinite"),
    "length mismatch": (lambda tmp: _npz(tmp, "len", X=np.ones((20, 2)), y=np.zeros(19, dtype=int)), "X has 20 rows but y has 19"),
    "labels out of range": (lambda tmp: [*_npz(tmp, "lab", X=np.ones((20, 2)), y=np.arange(20) % 4), "--set", "data.num_classes=3"],
                            "data.num_classes: labels must be in 0..2, found 3"),
    "empty dataset": (lambda tmp: _npz(tmp, "empty", X=np.ones((0, 2)), y=np.zeros(0, dtype=int)), "the dataset is empty"),
    "nan loss": (lambda tmp: ["--set", "train.lr=1e12", "--set", "train.optimizer=sgd", "--set", "train.warmup_epochs=0"],
                 "training stopped: epoch 0: loss became non-finite"),
    "unknown key": (lambda tmp: ["--set", "train.epochz=3"], "train.epochz: unknown key"),
    "negative lr": (lambda tmp: ["--set", "train.lr=-0.1"], "train.lr: Input should be greater than 0"),
    "missing data file": (lambda tmp: ["--set", f"data.source={tmp / 'nope.npz'}"], "data.source: file not found"),
    "bad model path": (lambda tmp: ["--set", "model.arch=no_such_pkg.models:make"], "model.arch: cannot import module 'no_such_pkg.models'"),
    "csv without label": (_csv_without_label, "data.label_column: column 'label' not in"),
    "init_from nothing": (lambda tmp: ["--set", f"train.init_from={tmp / 'no-model'}"], "train.init_from: "),
    "unknown strategy": (lambda tmp: ["--set", "train.strategy=hogwild"], "train.strategy: Input should be"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_fails_clearly(case, tiny_config, mlflow_store, tmp_path, capsys):
    make_args, message = CASES[case]
    rc = main(["run", "--config", str(tiny_config), *make_args(tmp_path)])
    err = capsys.readouterr().err
    assert rc != 0
    assert message in err
    client = MlflowClient(mlflow_store)
    exp = client.get_experiment_by_name("optforge-test")
    (run,) = client.search_runs([exp.experiment_id], "tags.`optforge.pipeline` = 'optimize'")
    assert run.info.status == "FAILED"
    assert message in run.data.tags["optforge.error"]
    assert client.search_registered_models() == []
    assert main(["runs", "--experiment", "optforge-test"]) == 0
    assert "FAILED" in capsys.readouterr().out


def test_cli_process_exit_code(tiny_config, tmp_path):
    """The installed console script exits non-zero (2 for config errors) in a real process."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'cli.db'}"}
    exe = Path(sys.executable).with_name("optforge")
    proc = subprocess.run([str(exe), "run", "--config", str(tiny_config), "--set", "train.epochz=3"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=180)
    assert proc.returncode == 2
    assert "train.epochz: unknown key" in proc.stderr
