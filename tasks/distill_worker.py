"""Ray Train distillation: the per-worker loop and its driver, in the train stage's pattern.

Same data-parallel setup as ``tasks/train_worker.py`` (DDP via ``prepare_model``, a
``DistributedSampler``, AMP and gradient accumulation from the nested ``TrainConfig``, a checkpoint
every epoch so a failed worker or a crashed driver resumes, per-epoch MLflow metrics from rank 0);
only the loss differs: Hinton's soft-target loss against the teacher's logits. Those logits are read
from a file computed once per (teacher, dataset), or, with ``cache_teacher_logits=false``, each worker
loads the teacher and runs it on every batch.
"""

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from tasks.techniques.data import load_splits
from tasks.techniques.distill import DistillConfig, fit_epoch, kd_loss
from tasks.techniques.models import ModelSpec, build_model, load_model
from tasks.techniques.training import EarlyStopping, evaluate, make_optimizer, make_scheduler, precision_for
from tasks.train_worker import CKPT_FILE, _mlflow_logger, _report, ensure_ray, latest_checkpoint


def _loss_fn(cfg: DistillConfig, teacher: torch.nn.Module | None):
    """KD loss on ``(logits, y, teacher_logits)`` batches, or on ``(logits, y, x)`` running the teacher live."""
    def cached(logits, y, soft):
        return kd_loss(logits, soft, y, cfg.temperature, cfg.alpha)

    def live(logits, y, x):
        with torch.no_grad():
            soft = teacher(x).float()
        return kd_loss(logits, soft, y, cfg.temperature, cfg.alpha)

    return cached if teacher is None else live


def distill_loop_per_worker(config: dict) -> None:
    """Runs in every Ray Train worker. ``config``: distill (dict), spec (dict), data/logits/teacher paths, mlflow ids."""
    cfg = DistillConfig.from_dict(config["distill"])
    tcfg = cfg.train
    torch.set_num_threads(tcfg.threads_per_worker)
    torch.manual_seed(tcfg.seed)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()

    splits = load_splits(config["data_path"])
    spec = ModelSpec(**config["spec"])
    base = build_model(spec)
    model = ray.train.torch.prepare_model(base)
    X, y = torch.as_tensor(splits.X_train), torch.as_tensor(splits.y_train)
    if config.get("logits_path"):
        with np.load(config["logits_path"], allow_pickle=False) as z:
            dataset, teacher = TensorDataset(X, y, torch.as_tensor(z["train"])), None
    else:  # the input itself rides along as the extra column so the teacher can run on it
        dataset = TensorDataset(X, y, X)
        teacher = load_model(config["teacher_path"])[0].to(device)
    loss_fn = _loss_fn(cfg, teacher)
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=tcfg.seed)
    loader = DataLoader(dataset, batch_size=tcfg.batch_size, sampler=sampler)
    steps_per_epoch = -(-len(loader) // tcfg.grad_accum_steps)

    opt = make_optimizer(model, tcfg)
    sched = make_scheduler(opt, tcfg, steps_per_epoch)
    precision = precision_for(device, tcfg.amp)
    stopper = EarlyStopping(tcfg.patience, tcfg.min_delta)
    best_state = copy.deepcopy(base.state_dict())
    start_epoch, done, state = 0, False, {}

    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / CKPT_FILE, map_location=device, weights_only=True)
        base.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if precision.scaler and state.get("scaler"):
            precision.scaler.load_state_dict(state["scaler"])
        stopper.load_state_dict(state["early_stopping"])
        best_state = state["best_model"]
        start_epoch, done = state["epoch"] + 1, state["done"]

    log = _mlflow_logger(config) if rank == 0 else None
    no_sync = model.no_sync if world > 1 else None
    epoch = start_epoch - 1
    for epoch in range(start_epoch, 0 if done else tcfg.epochs):
        sampler.set_epoch(epoch)
        t0 = time.perf_counter()
        stats = fit_epoch(model, loader, opt, sched, precision, tcfg.grad_accum_steps, loss_fn, no_sync, device)
        seconds = time.perf_counter() - t0
        val = evaluate(base, splits.X_val, splits.y_val, device=device)  # identical on every rank: same stop decision
        if stopper.update(val["accuracy"], epoch):
            best_state = copy.deepcopy(base.state_dict())
        metrics = {
            "train_loss": stats["loss"], "train_accuracy": stats["accuracy"], "val_loss": val["loss"],
            "val_accuracy": val["accuracy"], "samples_per_s": stats["samples"] * world / seconds,
            "lr": sched.get_last_lr()[0], "epoch_seconds": seconds, "epoch": epoch,
        }
        stop = stopper.should_stop or epoch + 1 == tcfg.epochs
        state = {
            "model": base.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "scaler": precision.scaler.state_dict() if precision.scaler else None,
            "early_stopping": stopper.state_dict(), "best_model": best_state, "epoch": epoch, "done": stop,
        }
        _report(metrics, state, rank, spec, best_state if stop else None)
        if log:
            log({k: v for k, v in metrics.items() if k != "epoch"}, step=epoch)
        if stop:
            break
    if done:  # resumed after the final checkpoint: report it again so the result carries it
        _report({"epoch": epoch, "resumed_done": 1}, state, rank, spec, best_state)


def run_distillation(
    cfg: DistillConfig, spec: ModelSpec, data_path: str, logits_path: str | None, teacher_path: str,
    storage: Path, name: str, out_dir: Path, mlflow_tracking_uri: str | None = None, mlflow_run_id: str | None = None,
) -> dict:
    """Launch the TorchTrainer; copy the best student into ``out_dir``; return a summary.

    ``name`` comes from the stage's cache key, so a re-run after a crash resumes from the newest checkpoint.
    """
    # See run_training: a 0.25 s health-check poll makes each epoch's report cost ~0.3 s instead of 2 s.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
    ensure_ray()
    from ray.train.torch import TorchTrainer

    resumed = latest_checkpoint(storage, name) is not None
    tcfg = cfg.train
    trainer = TorchTrainer(
        distill_loop_per_worker,
        train_loop_config={
            "distill": cfg.to_dict(), "spec": asdict(spec), "data_path": data_path, "logits_path": logits_path,
            "teacher_path": teacher_path, "mlflow_tracking_uri": mlflow_tracking_uri, "mlflow_run_id": mlflow_run_id,
        },
        scaling_config=ray.train.ScalingConfig(num_workers=tcfg.num_workers, use_gpu=tcfg.use_gpu),
        run_config=ray.train.RunConfig(
            name=name, storage_path=str(storage), checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            failure_config=ray.train.FailureConfig(max_failures=tcfg.max_failures),
        ),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    with result.checkpoint.as_directory() as d:
        src = Path(d) / "model"
        if not src.exists():
            raise RuntimeError("distillation ended without a final student checkpoint")
        out_dir.mkdir(parents=True, exist_ok=True)
        for f in ("model.pt", "model.json"):
            (out_dir / f).write_bytes((src / f).read_bytes())
        state = torch.load(Path(d) / CKPT_FILE, map_location="cpu", weights_only=True)
    return {
        "best_val_accuracy": state["early_stopping"]["best"], "best_epoch": state["early_stopping"]["best_epoch"],
        "epochs_run": state["epoch"] + 1, "resumed": resumed,
        "metrics": json.loads(json.dumps(result.metrics or {}, default=float)),
    }
