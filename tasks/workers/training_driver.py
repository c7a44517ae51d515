"""Launching training: the Ray Train ``TorchTrainer`` (ssgd, model averaging, fsdp) or the asgd actors.

The train and distill stages call ``run_training`` with one ``WorkerConfig``; it builds the shared
augmentation cache once, picks the strategy's launcher, waits, and copies the best model out of the
final checkpoint.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import ray
import ray.train
import torch

from optforge.tasks.runtime.progress import StageProgress
from optforge.tasks.techniques.data.augment import build_cache, cache_path
from optforge.tasks.techniques.data.data import load_splits
from optforge.tasks.workers.asgd_worker import run_asgd
from optforge.tasks.workers.train_worker import train_loop_per_worker
from optforge.tasks.workers.watchdog import RankWatch, TrainingStalled, Watchdog
from optforge.tasks.workers.worker_common import (
    CKPT_FILE,
    ERROR_FILE,
    WorkerConfig,
    ensure_ray,
    latest_checkpoint,
    training_summary,
)

# A collective that waited train.collective_timeout_s: gloo's words (torch's process group), or Ray Train's
# report barrier's error.
COLLECTIVE_TIMEOUT = re.compile(r"Timed out waiting \d+ms|BroadcastCollectiveTimeoutError")


def run_training(worker: WorkerConfig, storage: Path, name: str, out_dir: Path,
                 loop: Callable[[dict], None] = train_loop_per_worker) -> dict:
    """Launch the TorchTrainer; copy the best model into ``out_dir``; return the last metrics.

    ``name`` is derived from the cache key, so re-running the same stage after a crash finds the
    crashed run's checkpoints and resumes from the newest. ``loop`` is the per-worker function: the
    project's own; a test hands a wrapper of it that injects a fault into one rank.
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
    # Live progress in the terminal and on the Prefect flow run while the workers train (tasks/runtime/progress.py).
    with StageProgress("distill" if worker.kd else "train", cfg.epochs) as progress:
        if cfg.strategy == "asgd":  # no collective at all: a parameter server on plain Ray actors
            return run_asgd(worker, storage, name, out_dir, progress=progress.feed())
        ensure_ray()
        return _fit(worker, storage, name, out_dir, progress, loop)


def _fit(worker: WorkerConfig, storage: Path, name: str, out_dir: Path, progress: StageProgress,
         loop: Callable[[dict], None]) -> dict:
    """ssgd, model averaging and fsdp: Ray Train's ``TorchTrainer``, resuming from ``name``'s newest checkpoint.

    Every collective carries ``train.collective_timeout_s`` (torch's process group, and Ray Train's report
    barrier through its environment variable, which Ray hands on to the controller and workers), and the
    watchdog fails the stage when a rank goes silent for ``train.stall_timeout_s`` (``tasks.workers.watchdog``).

    Raises:
        TrainingStalled: the ranks stopped reporting; the run was aborted, its checkpoints kept.
    """
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg = worker.train_cfg
    os.environ["RAY_TRAIN_COLLECTIVE_TIMEOUT_S"] = str(cfg.collective_timeout_s)
    resumed = latest_checkpoint(storage, name) is not None
    trainer = TorchTrainer(
        loop,
        train_loop_config={"worker": worker.to_dict(), "progress": progress.remote_queue()},
        torch_config=TorchConfig(timeout_s=max(1, round(cfg.collective_timeout_s))),
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu),
        run_config=ray.train.RunConfig(
            name=name, storage_path=str(storage),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
        ),
    )
    watch = RankWatch(progress.label, cfg.num_workers, cfg.stall_timeout_s)
    progress.on_rank_event = watch.observe
    with Watchdog(watch) as watchdog:
        try:
            result = trainer.fit()
            error = result.error
        except Exception as exc:  # Ray Train v2 raises a worker's error (and the aborted controller's) from fit()
            error = exc
    if watchdog.message:
        raise TrainingStalled(watchdog.message) from error
    if error is not None:
        if COLLECTIVE_TIMEOUT.search(str(error)):
            raise TrainingStalled(
                f"{progress.label}: a rank waited longer than train.collective_timeout_s ({cfg.collective_timeout_s:g} "
                "s) in a collective its peers did not join (they took different paths) or could not finish. The "
                "stage's checkpoints are kept: the next run resumes from the newest.") from error
        raise error
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
