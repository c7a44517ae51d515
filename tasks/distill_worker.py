"""Distillation on Ray Train: the train stage's worker loop with a soft-target loss plugged in.

``run_distillation`` launches ``tasks.train_worker.run_training`` with a ``kd`` entry in the loop
config, so the student gets the teacher's data-parallel setup unchanged (DDP, AMP, accumulation,
a checkpoint per epoch, NaN handling, rank-0 MLflow metrics). The teacher's logits are read from a
file computed once per (teacher, dataset), or, with ``cache_teacher_logits=false``, each worker loads
the teacher and runs it on every batch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from tasks.techniques.distill import DistillConfig, kd_loss
from tasks.techniques.models import ModelSpec, load_model
from tasks.train_worker import run_training


def kd_dataset_and_loss(kd: dict, X: torch.Tensor, y: torch.Tensor, device):
    """``(dataset, loss_fn)`` for a worker: batches ``(x, y, teacher_logits)`` or ``(x, y, x)`` with a live teacher."""
    cfg = DistillConfig.from_dict(kd["distill"])
    if kd.get("logits_path"):
        with np.load(kd["logits_path"], allow_pickle=False) as z:
            soft = torch.as_tensor(z["train"])
        return TensorDataset(X, y, soft), lambda logits, yb, s: kd_loss(logits, s, yb, cfg.temperature, cfg.alpha)
    teacher = load_model(kd["teacher_path"])[0].to(device)

    def live(logits, yb, xb):
        with torch.no_grad():
            soft = teacher(xb).float()
        return kd_loss(logits, soft, yb, cfg.temperature, cfg.alpha)

    return TensorDataset(X, y, X), live


def run_distillation(
    cfg: DistillConfig, spec: ModelSpec, data_path: str, logits_path: str | None, teacher_path: str,
    storage: Path, name: str, out_dir: Path, mlflow_tracking_uri: str | None = None, mlflow_run_id: str | None = None,
) -> dict:
    """Train the student with ``cfg.train`` on Ray Train; the best student lands in ``out_dir``.

    ``name`` comes from the stage's cache key, so a re-run after a crash resumes from the newest checkpoint.
    """
    kd = {"distill": cfg.to_dict(), "logits_path": logits_path, "teacher_path": teacher_path}
    return run_training(cfg.train, spec, data_path, storage, name, out_dir, mlflow_tracking_uri, mlflow_run_id,
                        extra_config={"kd": kd})
