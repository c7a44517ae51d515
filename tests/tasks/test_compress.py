"""The prune and factorize task bodies against a real MLflow SQLite store (Ray-free)."""

import mlflow
import pytest
import torch
from mlflow import MlflowClient

from optforge.tasks.runtime.refs import Format, ModelRef, file_sha256
from optforge.tasks.runtime.tracking import configure
from optforge.tasks.stages.compress import factorize, prune, qat
from optforge.tasks.stages.data import prepare_data
from optforge.tasks.stages.distill import teacher_logits_file
from optforge.tasks.techniques.compression.factorize import FactorizeConfig
from optforge.tasks.techniques.compression.prune import PruneConfig
from optforge.tasks.techniques.compression.qat import QatConfig
from optforge.tasks.techniques.data.data import DataConfig, load_splits
from optforge.tasks.techniques.models.models import LowRank, ModelConfig, ModelSpec, save_model
from optforge.tasks.techniques.models.rebuild import build_model, load_model
from optforge.tasks.techniques.onnx.static import count_qdq_nodes
from optforge.tasks.techniques.training.finetune import FinetuneConfig
from optforge.tasks.techniques.training.training import evaluate

QUICK = FinetuneConfig(epochs=2, lr=3e-3)


@pytest.fixture
def teacher(mlflow_store, tmp_path):
    """An active parent run, the digits split and a quickly fitted 64-64 MLP teacher."""
    from optforge.tasks.techniques.training.finetune import finetune

    configure("compress")
    with mlflow.start_run(run_name="parent") as parent:
        data = prepare_data.fn(DataConfig(), None, str(tmp_path / "work"), parent.info.run_id)
        s = load_splits(data.path)
        spec = ModelSpec(ModelConfig(hidden=(64, 64)).to_dict(), data.contract)
        torch.manual_seed(0)
        model = build_model(spec)
        finetune(model, s.train, s.val, FinetuneConfig(epochs=8, lr=3e-3, kd_alpha=0))
        folder = save_model(model, spec, tmp_path / "teacher")
        ref = ModelRef("pytorch_fp32", Format.TORCH, str(folder), file_sha256(folder), "teacher-run-id")
        yield parent.info.run_id, data, ref, str(tmp_path / "work"), evaluate(model, s.test)["accuracy"]


def _child(client, parent_id, stage):
    exp = mlflow.get_experiment_by_name("compress").experiment_id
    (run,) = client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent_id}' and tags.`optforge.stage` = '{stage}'")
    return run


def test_structured_prune_task_logs_and_returns_a_smaller_model(teacher, mlflow_store):
    parent_id, data, ref, work, teacher_acc = teacher
    cfg = PruneConfig(sparsity=0.5, rounds=2, finetune=QUICK)
    out = prune.fn(cfg, ref, ref, data, work, parent_id, run_name="prune")
    pruned, spec = load_model(out.path)  # rebuilt from model.json: the zoo MLP plus its pruning history
    w1, w2, head = [m.out_features for m in pruned.net if isinstance(m, torch.nn.Linear)]
    assert 30 <= w1 <= 32 and 30 <= w2 <= 32 and head == 10  # 64 -> about half, in two rounds of 1 - 0.5 ** 0.5
    assert out.info["params"] < 64 * 64 + 64 * 64 + 64 * 10 and out.info["flops"] == 2 * (64 * w1 + w1 * w2 + w2 * 10)
    assert out.info["accuracy"] > teacher_acc - 5
    run = _child(MlflowClient(mlflow_store), parent_id, "prune")
    assert run.data.params["prune.sparsity"] == "0.5" and run.data.metrics["pruned_layers"] == 2
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
    from dataclasses import asdict

    import numpy as np
    from torch.utils.data import default_collate

    from optforge.tasks.techniques.compression.distill import DistillConfig
    from optforge.tasks.techniques.contract import table_contract
    from optforge.tasks.techniques.data.data import Part, Splits
    from optforge.tasks.techniques.models.models import ModelConfig, ModelSpec, save_model
    from optforge.tasks.techniques.models.rebuild import build_model
    from optforge.tasks.techniques.training.training import TrainConfig
    from optforge.tasks.workers.worker_common import KdConfig, WorkerConfig, train_dataset

    torch.manual_seed(0)
    contract = table_contract(6, 3)
    spec = ModelSpec(ModelConfig(hidden=(8,), dropout=0.0).to_dict(), contract.to_dict())
    teacher = build_model(spec).eval()
    save_model(teacher, spec, tmp_path / "teacher")
    X, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    np.savez(tmp_path / "logits.npz", train=teacher(X).detach().numpy())
    part = Part({"input": X.numpy()}, y.numpy())
    splits = Splits(contract, part, part.head(4), part.head(4))
    cfg = DistillConfig(temperature=3.0, alpha=0.8).to_dict()

    def dataset_and_loss(kd: KdConfig):
        worker = WorkerConfig(TrainConfig().to_dict(), asdict(spec), str(tmp_path), kd=kd)
        return train_dataset(worker, worker.train_cfg, splits, "cpu")

    cached_ds, cached_fn = dataset_and_loss(KdConfig(cfg, logits_path=str(tmp_path / "logits.npz")))
    live_ds, live_fn = dataset_and_loss(KdConfig(cfg, teacher_path=str(tmp_path / "teacher")))
    # One batch of all 16 rows: (inputs, labels, extra column): the cached logits, or the teacher's own inputs.
    _, cached_y, cached_extra = default_collate([cached_ds[i] for i in range(16)])
    _, live_y, live_extra = default_collate([live_ds[i] for i in range(16)])
    assert torch.equal(cached_y, y) and torch.equal(live_y, y)
    student_logits = torch.randn(16, 3, requires_grad=True)
    cached = cached_fn(student_logits, y, cached_extra)
    live = live_fn(student_logits, y, live_extra)
    torch.testing.assert_close(live, cached)
    live.backward()
    assert student_logits.grad is not None and student_logits.grad.abs().sum() > 0


def test_qat_task_exports_int8_qdq_and_logs_the_post_training_baseline(teacher, mlflow_store):
    parent_id, data, ref, work, teacher_acc = teacher
    out = qat.fn(QatConfig(finetune=QUICK), ref, ref, data, work, parent_id, run_name="qat_int8")
    assert out.format == Format.ONNX and count_qdq_nodes(out.path) > 0
    run = _child(MlflowClient(mlflow_store), parent_id, "qat")
    metrics = run.data.metrics
    assert {"accuracy_fp32", "accuracy_before_finetune", "accuracy", "qdq_nodes"} <= set(metrics)
    assert metrics["accuracy"] == out.info["accuracy"] > teacher_acc - 5
