"""The prune and factorize task bodies against a real MLflow SQLite store (Ray-free)."""

import mlflow
import pytest
import torch
from mlflow import MlflowClient

from tasks.compress import factorize, prune
from tasks.data import prepare_data
from tasks.distill import teacher_logits_file
from tasks.refs import ModelRef, file_sha256
from tasks.techniques.data import DataConfig, load_splits
from tasks.techniques.distill import FinetuneConfig
from tasks.techniques.factorize import FactorizeConfig
from tasks.techniques.models import LowRank, ModelConfig, ModelSpec, build_model, load_model, save_model
from tasks.techniques.prune import PruneConfig
from tasks.techniques.training import evaluate
from tasks.tracking import configure

QUICK = FinetuneConfig(epochs=2, lr=3e-3)


@pytest.fixture
def teacher(mlflow_store, tmp_path):
    """An active parent run, the digits split and a quickly fitted 64-64 MLP teacher."""
    from tasks.techniques.distill import finetune

    configure("compress")
    with mlflow.start_run(run_name="parent") as parent:
        data = prepare_data.fn(DataConfig(), None, str(tmp_path / "work"), parent.info.run_id)
        s = load_splits(data.path)
        spec = ModelSpec(ModelConfig(hidden=(64, 64)).to_dict(), data.num_features, data.num_classes, data.image_shape)
        torch.manual_seed(0)
        model = build_model(spec)
        finetune(model, s.X_train, s.y_train, s.X_val, s.y_val, FinetuneConfig(epochs=8, lr=3e-3, kd_alpha=0))
        folder = save_model(model, spec, tmp_path / "teacher")
        ref = ModelRef("pytorch_fp32", "torch", str(folder), file_sha256(folder), "teacher-run-id")
        yield parent.info.run_id, data, ref, str(tmp_path / "work"), evaluate(model, s.X_test, s.y_test)["accuracy"]


def _child(client, parent_id, stage):
    exp = mlflow.get_experiment_by_name("compress").experiment_id
    (run,) = client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent_id}' and tags.`optforge.stage` = '{stage}'")
    return run


def test_structured_prune_task_logs_and_returns_a_smaller_model(teacher, mlflow_store):
    parent_id, data, ref, work, teacher_acc = teacher
    cfg = PruneConfig(sparsity=0.5, rounds=2, finetune=QUICK)
    out = prune.fn(cfg, ref, ref, data, work, parent_id, run_name="prune")
    _, spec = load_model(out.path)
    assert spec.config["hidden"] == [32, 32]
    assert out.info["params"] < 64 * 64 + 64 * 64 + 64 * 10 and out.info["flops"] == 2 * (64 * 32 + 32 * 32 + 32 * 10)
    assert out.info["accuracy"] > teacher_acc - 5
    run = _child(MlflowClient(mlflow_store), parent_id, "prune")
    assert run.data.params["prune.sparsity"] == "0.5" and run.data.params["pruned_widths"] == "[32, 32]"
    assert {"accuracy", "accuracy_before", "params_ratio", "flops_ratio", "sparsity"} <= set(run.data.metrics)
    history = MlflowClient(mlflow_store).get_metric_history(run.info.run_id, "val_accuracy")
    assert [m.step for m in history] == [1, 2]  # one fine-tuning result per round
    assert run.data.tags["optforge.source_run"] == "teacher-run-id"


def test_unstructured_prune_says_it_gains_no_speed(teacher, mlflow_store):
    parent_id, data, ref, work, _ = teacher
    out = prune.fn(PruneConfig(method="unstructured", sparsity=0.7, rounds=1, finetune=QUICK), ref, ref, data, work,
                   parent_id)
    assert out.info["sparsity"] == pytest.approx(0.7, abs=0.01)
    run = _child(MlflowClient(mlflow_store), parent_id, "prune")
    assert "dense kernels" in run.data.tags["optforge.note"] and "70.0%" in run.data.tags["optforge.note"]
    assert run.data.metrics["flops_ratio"] == 1.0  # honest: the same dense work


def test_factorize_task_logs_ranks_and_the_model_rebuilds(teacher, mlflow_store):
    parent_id, data, ref, work, teacher_acc = teacher
    cfg = FactorizeConfig(mode="ratio", rank_ratio=0.25, finetune=QUICK)
    out = factorize.fn(cfg, ref, ref, data, work, parent_id)
    model, spec = load_model(out.path)
    assert spec.factorized == {"net.0": 16, "net.3": 16} == out.info["ranks"]
    assert isinstance(model.net[3], LowRank)
    assert out.info["accuracy"] > teacher_acc - 5
    run = _child(MlflowClient(mlflow_store), parent_id, "factorize")
    assert run.data.params["rank.net.3"] == "16"
    assert run.data.metrics["params"] < run.data.metrics["params_before"]


def test_teacher_logits_are_computed_once_per_dataset(teacher):
    _, data, ref, work, _ = teacher
    first = teacher_logits_file(ref, data, work)
    stamp = first.stat().st_mtime_ns
    assert teacher_logits_file(ref, data, work) == first and first.stat().st_mtime_ns == stamp


def test_distill_worker_live_teacher_loss_equals_cached_logits_loss(tmp_path):
    """``cache_teacher_logits=false`` runs the teacher per batch; the loss must be the very same, and the
    student's gradient must flow through it (the teacher alone runs without grad)."""
    import numpy as np

    from tasks.distill_worker import kd_dataset_and_loss
    from tasks.techniques.distill import DistillConfig
    from tasks.techniques.models import ModelConfig, ModelSpec, build_model, save_model

    torch.manual_seed(0)
    spec = ModelSpec(ModelConfig(hidden=(8,), dropout=0.0).to_dict(), 6, 3)
    teacher = build_model(spec).eval()
    save_model(teacher, spec, tmp_path / "teacher")
    X, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    np.savez(tmp_path / "logits.npz", train=teacher(X).detach().numpy())
    cfg = DistillConfig(temperature=3.0, alpha=0.8).to_dict()
    cached_ds, cached_fn = kd_dataset_and_loss({"distill": cfg, "logits_path": str(tmp_path / "logits.npz")}, X, y, "cpu")
    live_ds, live_fn = kd_dataset_and_loss({"distill": cfg, "teacher_path": str(tmp_path / "teacher")}, X, y, "cpu")
    student_logits = torch.randn(16, 3, requires_grad=True)
    cached = cached_fn(student_logits, y, cached_ds.tensors[2])
    live = live_fn(student_logits, y, live_ds.tensors[2])
    torch.testing.assert_close(live, cached)
    live.backward()
    assert student_logits.grad is not None and student_logits.grad.abs().sum() > 0
