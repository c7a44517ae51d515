"""Distillation on Ray Train: the train stage's launcher with a soft-target loss plugged in.

``run_distillation`` launches ``tasks.workers.training_driver.run_training`` with a ``KdConfig`` in the worker
config, so the student gets the teacher's data-parallel setup unchanged (DDP, AMP, accumulation, a
checkpoint per epoch, NaN handling, rank-0 MLflow metrics). The teacher's logits are read from a file
computed once per (teacher, dataset), or, with ``cache_teacher_logits=false``, each worker loads the
teacher and runs it on every batch.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from optforge.tasks.techniques.compression.distill import DistillConfig
from optforge.tasks.techniques.models.models import ModelSpec
from optforge.tasks.workers.training_driver import run_training
from optforge.tasks.workers.worker_common import KdConfig, WorkerConfig


def run_distillation(
    cfg: DistillConfig, spec: ModelSpec, data_path: str, logits_path: str | None, teacher_path: str,
    storage: Path, name: str, out_dir: Path, mlflow_tracking_uri: str | None = None, mlflow_run_id: str | None = None,
    init_path: str | None = None,
) -> dict:
    """Train the student with ``cfg.train`` on Ray Train; the best student lands in ``out_dir``.

    ``name`` comes from the stage's cache key, so a re-run after a crash resumes from the newest checkpoint.
    ``init_path``: a model folder with the student's starting weights (derived from the teacher, pretrained).
    """
    worker = WorkerConfig(cfg.train.to_dict(), asdict(spec), data_path, mlflow_tracking_uri, mlflow_run_id,
                          init_path=init_path, kd=KdConfig(cfg.to_dict(), logits_path, teacher_path))
    return run_training(worker, storage, name, out_dir)
