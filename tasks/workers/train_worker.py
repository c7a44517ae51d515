"""Ray Train data-parallel training: the per-worker loop of the ssgd, model-averaging and fsdp strategies.

The loop reads the data split by path (not through Ray's object store) so that workers on other
nodes only need shared storage, checkpoints every epoch through ``ray.train.report`` so that a
worker failure or a crashed driver resumes from the last epoch, and logs per-epoch metrics to MLflow
from rank 0 only. ``tasks.workers.training_driver`` launches it.
"""

from __future__ import annotations

import copy
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import ray
import ray.train
import ray.train.torch
import torch

from optforge.tasks.runtime.progress import ProgressFeed
from optforge.tasks.techniques.data.data import load_splits
from optforge.tasks.techniques.data.sampling import MixingSampler
from optforge.tasks.techniques.models.init_weights import apply_init, load_init_state
from optforge.tasks.techniques.models.models import ModelSpec, save_model
from optforge.tasks.techniques.models.rebuild import build_model
from optforge.tasks.techniques.training.agreement import from_rank_zero, sync_buffers
from optforge.tasks.techniques.training.averaging import ModelAverager
from optforge.tasks.techniques.training.sharding import (
    full_model_state,
    load_optimizer_shards,
    reshard,
    save_optimizer_shards,
    shard_model,
    worker_memory,
)
from optforge.tasks.techniques.training.training import (
    EarlyStopping,
    evaluate,
    make_optimizer,
    make_scheduler,
    precision_for,
    train_epoch,
)
from optforge.tasks.workers.watchdog import Heartbeat
from optforge.tasks.workers.worker_common import (
    CKPT_FILE,
    ERROR_FILE,
    WorkerConfig,
    make_loader,
    mlflow_logger,
    train_dataset,
)

OPT_SHARDS = "optimizer_shards"  # fsdp: every rank's slice of the optimizer state, beside rank 0's CKPT_FILE


def train_loop_per_worker(config: dict) -> None:
    """Runs in every Ray Train worker. ``config["worker"]`` is a ``WorkerConfig`` as a dict; ``config["progress"]``
    the driver's progress queue (``tasks.runtime.progress``), fed by rank 0."""
    worker = WorkerConfig.from_dict(config["worker"])
    cfg = worker.train_cfg
    torch.set_num_threads(cfg.threads_per_worker)
    torch.manual_seed(cfg.seed)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    queue = config.get("progress")  # an empty Ray queue is falsy: compare with None
    # Every rank tells the driver's watchdog where it is (tasks/workers/watchdog.py); rank 0 also shows progress.
    beat = (Heartbeat.to_queue(queue, rank, cfg.stall_timeout_s) if queue is not None
            else Heartbeat(lambda event: None, rank))
    beat.hello(_controller() if rank == 0 else None)

    splits = load_splits(worker.data_path)
    spec = worker.model_spec
    base = build_model(spec)
    if worker.init_path:  # fine-tuning: before DDP, which broadcasts rank 0's weights
        apply_init(base, load_init_state(worker.init_path, spec, cfg.init_from))
    # Resumed weights go into the whole model before it is wrapped: fsdp then shards them.
    restored = ray.train.get_checkpoint()
    state = _read_state(restored, device)
    if state:
        base.load_state_dict(state["model"])
    averaging, sharded = cfg.strategy == "model_averaging", cfg.strategy == "fsdp"
    # Only rank 0 writes the final model; under fsdp the other ranks never keep a whole copy.
    best_state = copy.deepcopy(state["best_model"] if state else base.state_dict()) if rank == 0 or not sharded else {}
    if sharded:
        # fsdp: FSDP2 on the process group Ray Train set up (Ray's prepare_model(parallel_strategy="fsdp")
        # is FSDP1 and CUDA-only). Gradients are reduce-scattered on every micro-batch, accumulation
        # included, so that a worker never holds a whole gradient (no no_sync window).
        model = shard_model(base.to(device), cfg.fsdp_unit_params, cfg.fsdp_reshard_after_forward)
    else:
        # ssgd: DDP all-reduces gradients every step. model_averaging: no DDP; ModelAverager all-reduces
        # the weights every cfg.local_steps optimizer steps instead. gradient_as_bucket_view: the gradients
        # live in DDP's buckets, which saves a copy of every gradient per step (bench/ddp_overhead.py on the
        # teacher MLP, 2 processes vs 1: 1.44-1.52x -> 1.60-1.66x with per-tensor AdamW, 1.14x -> 1.17x fused).
        model = ray.train.torch.prepare_model(base, parallel_strategy=None if averaging else "ddp",
                                              parallel_strategy_kwargs={"gradient_as_bucket_view": True})
    dataset, loss_fn = train_dataset(worker, cfg, splits, device, base)
    sampler = MixingSampler(len(splits.train), len(splits.new), cfg.mix, cfg.tail_fraction, world, rank, cfg.seed)
    loader = make_loader(dataset, sampler, cfg.batch_size, cfg.loader)
    steps_per_epoch = -(-len(loader) // cfg.grad_accum_steps)

    opt = make_optimizer(model, cfg)
    sched = make_scheduler(opt, cfg, steps_per_epoch)
    precision = precision_for(device, cfg.amp)
    stopper = EarlyStopping(cfg.patience, cfg.min_delta)
    start_epoch, done = 0, False
    if state:
        if not sharded:
            opt.load_state_dict(state["optimizer"])
        elif not state["done"]:  # each rank reads its slice (and a finished run trains no more)
            with restored.as_directory() as d:
                load_optimizer_shards(model, opt, Path(d) / OPT_SHARDS)
        sched.load_state_dict(state["scheduler"])
        if precision.scaler and state.get("scaler"):
            precision.scaler.load_state_dict(state["scaler"])
        stopper.load_state_dict(state["early_stopping"])
        start_epoch, done = state["epoch"] + 1, state["done"]
        if sharded and rank != 0:  # loaded and sliced: only rank 0 reports whole states again
            state = {k: v for k, v in state.items() if k not in ("model", "optimizer", "best_model")}

    log = mlflow_logger(worker) if rank == 0 else None
    feed = ProgressFeed.to_queue(queue, cfg.epochs) if rank == 0 and queue is not None else None
    averager = ModelAverager(base, cfg.local_steps) if averaging else None
    if averager:
        averager.average()  # start from identical weights (DDP would have broadcast them)
    if start_epoch == 0:
        # The starting point's loss: a fresh model's ~ln(classes), a fine-tuned one's much lower. Every rank
        # runs it (a sharded forward is a collective; a rank that waited meanwhile in DDP's first broadcast
        # would count the whole evaluation against train.collective_timeout_s).
        first = evaluate(base, splits.val, device=device, on_batch=lambda: beat.beat(-1, "evaluating"))
        if sharded:
            reshard(model)  # evaluation leaves the root unit gathered
    if log and start_epoch == 0:
        log({"initial_val_loss": first["loss"], "initial_val_accuracy": first["accuracy"]}, step=0)
    no_sync = model.no_sync if world > 1 and not (averaging or sharded) else None
    epoch = start_epoch - 1
    for epoch in range(start_epoch, 0 if done else cfg.epochs):
        sampler.set_epoch(epoch)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        t0 = time.perf_counter()
        beat.beat(epoch, "training")
        try:
            stats = train_epoch(model, loader, opt, sched, precision, cfg.grad_accum_steps, no_sync, device, loss_fn,
                                after_step=averager.after_step if averager else None,
                                on_batch=_on_batch(beat, feed, epoch))
            if averager:
                averager.average()  # every rank evaluates and checkpoints the same weights
        except FloatingPointError as exc:
            # Deterministic: every rank raises at the same step (see train_epoch). Report instead of
            # raising, so Ray Train's failure handling does not restart a run that would fail again.
            _report_error(f"epoch {epoch}: {exc}", rank)
            beat.finished(epoch)
            return
        seconds = time.perf_counter() - t0
        # One model, one decision (tasks/techniques/training/agreement.py). Equal weights are not enough: each rank's
        # forward passes updated its own BatchNorm statistics, so the buffers are made equal first; then
        # rank 0's metrics drive early stopping, the best checkpoint and the stop on every rank.
        if not averager:  # the averager's all-reduce has just averaged the buffers with the weights
            sync_buffers(base)
        beat.beat(epoch, "evaluating")
        val = from_rank_zero(evaluate(base, splits.val, device=device,
                                      on_batch=lambda e=epoch: beat.beat(e, "evaluating")))
        # fsdp: the gather is a collective on every rank (and reshards the root unit that evaluation left
        # gathered); rank 0 receives a fresh CPU copy, the others {}. The optimizer state stays sharded.
        model_state = full_model_state(model) if sharded else base.state_dict()
        if stopper.update(val["accuracy"], epoch):
            best_state = model_state if sharded else copy.deepcopy(model_state)
        metrics = {
            "train_loss": stats["loss"], "train_accuracy": stats["accuracy"], "val_loss": val["loss"],
            "val_accuracy": val["accuracy"], "samples_per_s": stats["samples"] * world / seconds,
            "lr": sched.get_last_lr()[0], "epoch_seconds": seconds, "epoch": epoch,
            **({"averaging_rounds": averager.rounds} if averager else {}), **worker_memory(model, opt),
        }
        stop = stopper.should_stop or epoch + 1 == cfg.epochs  # equal on every rank: equal inputs, equal state
        beat.beat(epoch, "checkpointing")
        state = {
            "model": model_state, "optimizer": None if sharded else opt.state_dict(), "scheduler": sched.state_dict(),
            "scaler": precision.scaler.state_dict() if precision.scaler else None,
            "early_stopping": stopper.state_dict(), "best_model": best_state, "epoch": epoch, "done": stop,
        }
        _report(metrics, state, rank, spec, best_state if stop else None,
                (lambda folder: save_optimizer_shards(model, opt, folder)) if sharded else None)
        if log:
            log({k: v for k, v in metrics.items() if k != "epoch"}, step=epoch)
        if feed:
            feed.epoch(epoch, metrics)
        if stop:
            break
    if done:  # resumed after the final checkpoint: report it again so the result carries it
        _report({"epoch": epoch, "resumed_done": 1}, state, rank, spec, best_state)
    beat.finished(epoch)
    if log:
        log.flush()


def _on_batch(beat: Heartbeat, feed: ProgressFeed | None, epoch: int) -> Callable[[int, int], None]:
    """After each micro-batch: the watchdog's beat on every rank, the shown step on rank 0."""
    def on_batch(done: int, total: int) -> None:
        beat.beat(epoch, "training")
        if feed:
            feed.batch(epoch, done, total)

    return on_batch


def _controller():
    """Ray Train's controller actor, which the driver's watchdog asks to abort a stalled run; None if this Ray
    version keeps it elsewhere (Ray 2.60's v2 train context holds it; there is no public accessor)."""
    try:
        from ray.train.v2._internal.execution.context import get_train_context

        return get_train_context().controller_actor
    except Exception:
        return None


def _read_state(checkpoint: ray.train.Checkpoint | None, device) -> dict | None:
    """The training state of the checkpoint Ray Train restores after a failure (every rank reads it), or None."""
    if not checkpoint:
        return None
    with checkpoint.as_directory() as d:
        # An error checkpoint (see _report_error) holds no training state: start afresh.
        if (Path(d) / CKPT_FILE).exists():
            return torch.load(Path(d) / CKPT_FILE, map_location=device, weights_only=True)
    return None


def _report(metrics: dict, state: dict, rank: int, spec: ModelSpec, final_model: dict | None,
            write_shards: Callable[[Path], None] | None = None) -> None:
    """All ranks report; rank 0 attaches the checkpoint (training state, plus the best model at the end).

    With ``write_shards`` (fsdp) every rank first writes its slice of the optimizer state (a collective) and
    attaches its folder too: Ray Train uploads all ranks' folders into the same checkpoint folder.
    """
    with tempfile.TemporaryDirectory() as d:
        if write_shards:
            write_shards(Path(d) / OPT_SHARDS)
        if rank != 0:
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d) if write_shards else None)
            return
        torch.save(state, Path(d) / CKPT_FILE)
        if final_model is not None:
            model = build_model(spec)
            model.load_state_dict(final_model)
            save_model(model, spec, Path(d) / "model")
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def _report_error(message: str, rank: int) -> None:
    """End training with an error the driver re-raises. Ray Train v2 exposes the metrics of the last
    *checkpoint*, not the last report, so the message travels in a checkpoint of its own."""
    if rank != 0:
        ray.train.report({"error": message})
        return
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / ERROR_FILE).write_text(json.dumps({"error": message}))
        ray.train.report({"error": message}, checkpoint=ray.train.Checkpoint.from_directory(d))
