"""The synchronous strategies on a real local Ray with 2 Ray Train workers, and fine-tuning from a
registered model in a real MLflow store. (asgd has its own file: tests/tasks/test_asgd.py.)"""

from dataclasses import asdict

import mlflow
import pytest
from mlflow import MlflowClient

from optforge.tasks.runtime.refs import Format, ModelRef, file_sha256
from optforge.tasks.runtime.tracking import configure
from optforge.tasks.stages.data import prepare_data
from optforge.tasks.stages.init_from import fetch_init_model
from optforge.tasks.stages.register import _log_onnx, _log_torch
from optforge.tasks.stages.train import train
from optforge.tasks.techniques.data.data import DataConfig, load_splits
from optforge.tasks.techniques.models.models import ModelConfig, ModelSpec
from optforge.tasks.techniques.models.rebuild import build_model, load_model
from optforge.tasks.techniques.training.training import TrainConfig, evaluate
from optforge.tasks.workers.training_driver import run_training
from optforge.tasks.workers.worker_common import WorkerConfig
from tests.trained import train_in_process

pytestmark = pytest.mark.slow
SMALL = ModelConfig(hidden=(64,), dropout=0.0)


@pytest.fixture
def digits(mlflow_store, tmp_path):
    """An active parent run and the digits split prepared by the real stage body."""
    configure("strategies")
    with mlflow.start_run(run_name="parent") as parent:
        data = prepare_data.fn(DataConfig(), None, str(tmp_path / "work"), parent.info.run_id)
        yield data, parent.info.run_id, str(tmp_path / "work")


@pytest.mark.parametrize("strategy, extra, floor", [
    ("ssgd", {}, 90.0),
    # 4 local steps between averages, with bf16 autocast and 2-step accumulation on top.
    ("model_averaging", {"local_steps": 4, "amp": True, "grad_accum_steps": 2}, 88.0),
])
def test_strategy_reaches_accuracy_with_two_workers(digits, strategy, extra, floor, tmp_path):
    data, parent, _ = digits
    spec = ModelSpec(SMALL.to_dict(), data.contract)
    cfg = TrainConfig(strategy=strategy, epochs=6, batch_size=32, lr=0.01, patience=0, num_workers=2, **extra)
    worker = WorkerConfig(cfg.to_dict(), asdict(spec), data.path)
    summary = run_training(worker, tmp_path / "ray", f"acc-{strategy}", tmp_path / "out")
    assert summary["best_val_accuracy"] >= floor
    assert summary["epochs_run"] == 6
    if strategy == "model_averaging":
        # 1,257 samples / 2 workers / 32 per batch = 20 micro-batches, 10 optimizer steps per epoch:
        # 2 averages every 4 steps + 1 at the epoch's end = 3 per epoch (+1 at the start).
        assert summary["metrics"]["averaging_rounds"] == 1 + 6 * 3


def _trained_folder(data, tmp_path) -> tuple[ModelRef, float]:
    """A small MLP trained in-process for a few epochs; its folder and its val loss."""
    splits = load_splits(data.path)
    model, ref = train_in_process(SMALL, data, splits, 8, tmp_path / "trained")
    return ref, evaluate(model, splits.val)["loss"]


def test_init_from_a_registered_model_starts_from_its_weights(digits, tmp_path):
    data, parent, workdir = digits
    ref, trained_loss = _trained_folder(data, tmp_path)
    splits = load_splits(data.path)
    with mlflow.start_run(run_name="register", nested=True):
        info = _log_torch(ref, data, splits, "optforge-init")
    MlflowClient().set_registered_model_alias("optforge-init", "champion", str(info.registered_model_version))

    init = fetch_init_model("models:/optforge-init@champion", workdir)
    assert init.info["resolved"] == f"models:/optforge-init/{info.registered_model_version}"
    assert init.sha256 == ref.sha256  # the exact weights that were registered
    cfg = TrainConfig(epochs=1, batch_size=32, lr=1e-3, num_workers=2, init_from="models:/optforge-init@champion")
    out = train.fn(cfg, SMALL, data, workdir, parent, init=init)
    run = MlflowClient().get_run(out.run_id)
    initial = MlflowClient().get_metric_history(out.run_id, "initial_val_loss")[0].value
    fresh = evaluate(build_model(load_model(ref.path)[1]), splits.val)["loss"]
    assert initial == pytest.approx(trained_loss, rel=1e-4)  # the trained model's loss ...
    assert initial < 0.5 * fresh  # ... not a fresh one's (~ln 10 = 2.3)
    assert run.data.tags["optforge.init_resolved"] == init.info["resolved"]


@pytest.mark.parametrize("uri, message", [
    ("models:/no-such-model@champion", "train.init_from: no registered model version at models:/no-such-model@champion"),
    ("runs:/0123456789abcdef/model", "train.init_from: cannot fetch runs:/0123456789abcdef/model"),
    ("/no/such/folder", "train.init_from: /no/such/folder does not exist"),
])
def test_init_from_pointing_at_nothing(digits, uri, message):
    with pytest.raises(ValueError) as err:
        fetch_init_model(uri, digits[2])
    assert message in str(err.value)


def test_init_from_an_onnx_version_says_what_to_use_instead(digits, tmp_path):
    from optforge.tasks.techniques.onnx.export import ExportConfig, export_onnx

    data, parent, workdir = digits
    ref, _ = _trained_folder(data, tmp_path)
    model, spec = load_model(ref.path)
    onnx_path = export_onnx(model, spec.inputs, tmp_path / "m.onnx", ExportConfig())
    onnx_ref = ModelRef("onnx_fp32", Format.ONNX, str(onnx_path), file_sha256(onnx_path))
    mlflow.set_tag("optforge.stage.train.run_id", "feedc0de")  # what the flow records on its parent run
    with mlflow.start_run(run_name="register", nested=True):
        info = _log_onnx(onnx_ref, data, load_splits(data.path), "optforge-onnx")
    MlflowClient().set_model_version_tag("optforge-onnx", str(info.registered_model_version), "pipeline_run", parent)
    with pytest.raises(ValueError, match="not a PyTorch model that can be fine-tuned; its FP32 PyTorch source is "
                                         "runs:/feedc0de/model"):
        fetch_init_model("models:/optforge-onnx/1", workdir)


def test_kl_adaptation_keeps_the_original_and_plain_fine_tuning_learns_the_new_scene(mlflow_store, tmp_path):
    """Scene adaptation: the new data are the digits mirrored left to right, same labels. Fine-tuning from the
    model trained on the old digits, train.kl_weight=1 keeps its outputs (old and new test accuracy as before);
    kl_weight=0 learns the mirrored digits. Both runs log the old and new accuracy apart."""
    import numpy as np

    from optforge.tasks.techniques.data.tables import read_table

    X, y = read_table("digits", "label")
    np.savez(tmp_path / "mirrored.npz", X=X.reshape(-1, 8, 8)[:, :, ::-1].reshape(len(X), 64), y=y)
    configure("adaptation")
    with mlflow.start_run(run_name="parent") as parent:
        workdir = str(tmp_path / "work")
        data = prepare_data.fn(DataConfig(new_source=str(tmp_path / "mirrored.npz")), None, workdir,
                               parent.info.run_id, new_source_sha256="mirrored")
        original, _ = _trained_folder(data, tmp_path)
        init = fetch_init_model(original.path, workdir)
        metrics = {}
        for weight in (1.0, 0.0):
            cfg = TrainConfig(epochs=4, batch_size=32, lr=3e-3, weight_decay=0.0, patience=0, num_workers=1,
                              init_from=original.path, kl_weight=weight)
            out = train.fn(cfg, SMALL, data, workdir, parent.info.run_id, init=init)
            metrics[weight] = MlflowClient().get_run(out.run_id).data.metrics
    kept, plain = metrics[1.0], metrics[0.0]
    assert kept["test_accuracy_old_before"] > 90 and kept["test_accuracy_new_before"] < 50  # a real scene shift
    # kl_weight=1 stays at the original (within a few rows: training rounds differently on another CPU) ...
    assert abs(kept["test_accuracy_old_after"] - kept["test_accuracy_old_before"]) <= 3
    assert abs(kept["test_accuracy_new_after"] - kept["test_accuracy_new_before"]) <= 5  # ... new data included
    assert plain["test_accuracy_new_after"] > plain["test_accuracy_new_before"] + 20  # plain fine-tuning adapts
    assert plain["test_accuracy_new_after"] > kept["test_accuracy_new_after"] + 30  # and KL is what held it back
    # measured: kl_weight 1: old 98.1 -> 97.4, new 39.3 -> 39.3; kl_weight 0: old 98.1 -> 95.9, new 39.3 -> 93.7
