"""Prefect task: distill the trained teacher into a smaller student on Ray Train, tracked in a child MLflow run."""

from __future__ import annotations

import hashlib
from pathlib import Path

import mlflow
import numpy as np

from optforge.tasks.runtime.caching import stage_dir, stage_task
from optforge.tasks.runtime.refs import DataRef, Format, ModelRef, file_sha256
from optforge.tasks.runtime.tracking import child_run, tracking_uri
from optforge.tasks.techniques.compression.distill import DistillConfig, check_student, teacher_logits
from optforge.tasks.techniques.compression.students import share_layers, student_model
from optforge.tasks.techniques.data.data import load_splits
from optforge.tasks.techniques.files import atomic_write
from optforge.tasks.techniques.measurement.flops import model_stats
from optforge.tasks.techniques.models.models import ModelSpec, num_layers, save_model
from optforge.tasks.techniques.models.rebuild import load_model
from optforge.tasks.techniques.training.training import evaluate
from optforge.tasks.workers.distill_worker import run_distillation


def teacher_logits_file(teacher: ModelRef, data: DataRef, workdir: str) -> Path:
    """The teacher's logits on the train split, computed once per (teacher content, dataset) and reused.

    Distillation and every KD fine-tuning of a chain read the same file, so the 6.4 M-parameter
    teacher runs over the training set once per pipeline, not once per epoch and stage.
    """
    key = hashlib.sha256(f"{teacher.sha256}:{data.sha256}".encode()).hexdigest()[:16]
    path = Path(workdir).resolve() / "teacher_logits" / key / "logits.npz"
    if path.exists():
        return path
    model, _ = load_model(teacher.path)
    splits = load_splits(data.path)
    logits = teacher_logits(model, splits.fit)  # rows in the order the workers' datasets use
    return atomic_write(path, lambda tmp: np.savez(tmp, train=logits), suffix=".npz")


def compare_to_teacher(student, teacher, splits) -> dict[str, float]:
    """Test accuracy of both, retention (student / teacher accuracy) and the params and FLOPs ratios."""
    s_acc = evaluate(student, splits.test)["accuracy"]
    t_acc = evaluate(teacher, splits.test)["accuracy"]
    s, t = model_stats(student, splits.contract), model_stats(teacher, splits.contract)
    return {"student_accuracy": s_acc, "teacher_accuracy": t_acc, "retention": s_acc / t_acc if t_acc else 0.0,
            "params": s["params"], "flops": s["flops"], "teacher_params": t["params"], "teacher_flops": t["flops"],
            "params_ratio": s["params"] / t["params"], "flops_ratio": s["flops"] / t["flops"] if t["flops"] else 0.0}


def _describe_student(cfg: DistillConfig, spec: ModelSpec) -> str:
    """One line for the run's tags: what the student is and where its weights start."""
    if cfg.derive == "layers":
        return f"teacher's layers, one in {cfg.layer_stride} kept ({num_layers(spec.hf_config)} layers)"
    if cfg.derive == "width":
        return f"teacher narrowed to {cfg.width_keep:.0%} of every layer's channels"
    return f"{cfg.student.arch}" + (f" from {cfg.student.path}" if cfg.student.path else "")


@stage_task("distill")
def distill(cfg: DistillConfig, teacher: ModelRef, data: DataRef, workdir: str, parent_run_id: str | None,
            run_name: str = "distill") -> ModelRef:
    """Train ``cfg.student`` on the teacher's soft targets and the labels; return the student's model folder.

    ``run_name`` names the MLflow child run (the chain step, e.g. "distill").
    """
    out = stage_dir(workdir, "distill", {"distill": cfg, "teacher": teacher, "data": data})
    tags = {"optforge.source_run": teacher.run_id or ""}
    with child_run(parent_run_id, "distill", run_name=run_name, params={"distill": cfg.to_dict()}, tags=tags,
                   system_metrics=True) as run:
        teacher_model, teacher_spec = load_model(teacher.path)
        # Built here so a bad student fails in seconds, before Ray starts workers; a student that is not
        # smaller than its teacher only warns (it may still be the better model).
        student, spec, has_weights = student_model(cfg.student, cfg.derive, teacher_model, teacher_spec,
                                                   cfg.layer_stride, cfg.width_keep)
        if cfg.share_layers > 1:  # recorded in the spec, so the workers' student (and every rebuild) shares too
            mlflow.log_metric("distinct_layers", share_layers(student, cfg.share_layers))
            spec = spec.then("distill", {"share_layers": cfg.share_layers})
        init = save_model(student, spec, out / "init") if has_weights else None
        mlflow.set_tag("optforge.student", _describe_student(cfg, spec))
        n_student, n_teacher = check_student(student, teacher_model)
        if n_student >= n_teacher:
            mlflow.set_tag("optforge.warning", f"distill.student has {n_student:,} params >= teacher's {n_teacher:,}")
        logits = teacher_logits_file(teacher, data, workdir) if cfg.cache_teacher_logits else None
        storage = Path(cfg.train.storage_path or Path(workdir) / "ray").resolve()
        summary = run_distillation(
            cfg, spec, data.path, str(logits) if logits else None, teacher.path, storage, name=f"distill-{out.name}",
            out_dir=out / "model", mlflow_tracking_uri=tracking_uri(), mlflow_run_id=run.info.run_id,
            init_path=str(init) if init else None,
        )
        student, _ = load_model(out / "model")
        stats = compare_to_teacher(student, teacher_model, load_splits(data.path))
        mlflow.log_metrics({**stats, **{k: summary[k] for k in ("best_val_accuracy", "best_epoch", "epochs_run")}})
        mlflow.set_tag("optforge.resumed_from_checkpoint", str(summary["resumed"]).lower())
        mlflow.log_artifacts(str(out / "model"), "model")
    info = {k: stats[k] for k in ("params", "flops", "student_accuracy", "retention", "params_ratio", "flops_ratio")}
    return ModelRef("distill", Format.TORCH, str(out / "model"), file_sha256(out / "model"), run.info.run_id,
                    info | {"best_val_accuracy": summary["best_val_accuracy"]})

