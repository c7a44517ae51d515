"""One failing chain never sinks the run (flows/isolation.py): a user's module that pruning breaks (its forward
hard-codes a reshape) fails the prune chain; the other chain and the baselines are benchmarked and one is
registered, the run exits 0 (1 with ``--strict``), and the failure is recorded where a user looks for it."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow import MlflowClient

from optforge.flows.cli import main

pytestmark = pytest.mark.slow


def test_a_failing_chain_ends_alone_and_the_run_registers_the_rest(tmp_path, mlflow_store, monkeypatch, capsys):
    from tests.conftest import _stop_ray

    _stop_ray()  # the factory's module must import on the Ray workers: a fresh local Ray inherits PYTHONPATH
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parents[2]))
    config = {"model": {"arch": "tests.flows.byo_models:fixed_width_net"},
              "train": {"epochs": 2, "batch_size": 64, "num_workers": 1, "patience": 0},
              "compress": {"chains": [["prune", "quantize"], ["factorize", "quantize"]],
                           "prune": {"finetune": {"epochs": 1}}, "factorize": {"finetune": {"epochs": 1}}},
              "onnx": {"static": {"enabled": False}},
              "benchmark": {"warmup": 2, "iters_b1": 10, "iters_batch": 2},
              "register": {"max_accuracy_drop": 100.0},
              "tracking": {"experiment": "isolation", "workdir": str(tmp_path / "work")}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(config))

    assert main(["run", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "prune_int8: failed (prune: " in out
    assert out.strip().splitlines()[-1].startswith("1 variant(s) failed: prune_int8")

    client = MlflowClient(mlflow_store)
    exp = client.get_experiment_by_name("isolation").experiment_id
    (parent,) = client.search_runs([exp], "tags.`optforge.pipeline` = 'optimize'")
    assert parent.info.status == "FINISHED" and parent.data.tags["optforge.registered"] != "none"
    assert parent.data.tags["optforge.failed.prune_int8"].startswith("prune: ")
    assert "Traceback" in mlflow.artifacts.load_text(f"{parent.info.artifact_uri}/failures/prune_int8.txt")
    children = client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    bench = {r.data.tags["optforge.variant"]: r for r in children if r.data.tags["optforge.stage"] == "benchmark"}
    assert bench["prune_int8"].info.status == "FAILED"
    assert bench["factorize_int8"].info.status == "FINISHED" and bench["factorize_int8"].data.metrics["accuracy"] > 0
    (prune_run,) = [r for r in children if r.data.tags["optforge.stage"] == "prune"]
    assert prune_run.info.status == "FAILED" and prune_run.data.tags["optforge.error"]

    # --strict fails the command; the failed chain was not cached, so it ran (and failed) again.
    assert main(["run", "--config", str(path), "--strict"]) == 1
    runs = client.search_runs([exp], "tags.`optforge.stage` = 'prune'")
    assert len(runs) == 2 and all(r.info.status == "FAILED" for r in runs)
