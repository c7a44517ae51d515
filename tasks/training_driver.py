"""Launching training: the Ray Train ``TorchTrainer`` (ssgd, model averaging, fsdp) or the asgd actors.

The train and distill stages call ``run_training`` with one ``WorkerConfig``; it builds the shared
augmentation cache once, picks the strategy's launcher, waits, and copies the best model out of the
final checkpoint.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import ray
import ray.train
import torch

from optforge.tasks.asgd_worker import run_asgd
from optforge.tasks.progress import StageProgress
from optforge.tasks.techniques.augment import build_cache, cache_path
from optforge.tasks.techniques.data import load_splits
from optforge.tasks.train_worker import train_loop_per_worker
from optforge.tasks.worker_common import (
    CKPT_FILE,
    ERROR_FILE,
    WorkerConfig,
    ensure_ray,
    latest_checkpoint,
    training_summary,
)


def run_training(worker: WorkerConfig, storage: Path, name: str, out_dir: Path) -> dict:
    """Launch the TorchTrainer; copy the best model into ``out_dir``; return the last metrics.

    ``name`` is derived from the cache key, so re-running the same stage after a crash finds the
    crashed run's checkpoints and resumes from the newest.
    """
    # Ray Train v2's controller polls workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (default 2 s) and
    # each ray.train.report waits for that poll: with 0.25 s an epoch of this size costs ~0.3 s of
    # reporting instead of 2 s. The driver's value reaches the controller when the trainer is made.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
    cfg = worker.train_cfg
    if cfg.loader.augment_copies and cfg.loader.cache:
        # Built once by the driver, before any worker starts; workers of every strategy memory-map it.
        splits = load_splits(worker.data_path)
        (name_in,) = splits.contract.names
        path = cache_path(worker.data_path, cfg.loader, cfg.seed)
        built = build_cache(splits.fit.inputs[name_in], cfg.loader, splits.contract.image_shape, cfg.seed, path)
        worker = replace(worker, augment_path=str(built))
    # Live progress in the terminal and on the Prefect flow run while the workers train (tasks/progress.py).
    with StageProgress("distill" if worker.kd else "train", cfg.epochs) as progress:
        if cfg.strategy == "asgd":  # no collective at all: a parameter server on plain Ray actors
            return run_asgd(worker, storage, name, out_dir, progress=progress.feed())
        ensure_ray()
        return _fit(worker, storage, name, out_dir, progress.remote_queue())


def _fit(worker: WorkerConfig, storage: Path, name: str, out_dir: Path, progress_queue) -> dict:
    """ssgd, model averaging and fsdp: Ray Train's ``TorchTrainer``, resuming from ``name``'s newest checkpoint."""
    from ray.train.torch import TorchTrainer

    cfg = worker.train_cfg
    resumed = latest_checkpoint(storage, name) is not None
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"worker": worker.to_dict(), "progress": progress_queue},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu),
        run_config=ray.train.RunConfig(
            name=name, storage_path=str(storage),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
        ),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    with result.checkpoint.as_directory() as d:
        if (Path(d) / ERROR_FILE).exists():
            raise FloatingPointError(f"training stopped: {json.loads((Path(d) / ERROR_FILE).read_text())['error']}")
        src = Path(d) / "model"
        if not src.exists():
            raise RuntimeError("training ended without a final model checkpoint")
        out_dir.mkdir(parents=True, exist_ok=True)
        for f in ("model.pt", "model.json"):
            (out_dir / f).write_bytes((src / f).read_bytes())
        state = torch.load(Path(d) / CKPT_FILE, map_location="cpu", weights_only=True)
    return training_summary(state, resumed, json.loads(json.dumps(result.metrics or {}, default=float)))
