"""Ray Train data-parallel training: the per-worker loop and the driver that launches it.

The loop reads the data split by path (not through Ray's object store) so that workers on other
nodes only need shared storage, checkpoints every epoch through ``ray.train.report`` so that a
worker failure or a crashed driver resumes from the last epoch, and logs per-epoch metrics to MLflow
from rank 0 only.
"""

from __future__ import annotations

import copy
from dataclasses import asdict
import json
import os
import tempfile
import time
from pathlib import Path

import ray
import ray.train
import ray.train.torch
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from tasks.techniques.augment import AugmentedDataset, CachedCopies, build_cache, cache_path
from tasks.techniques.averaging import ModelAverager
from tasks.techniques.data import Splits, load_splits
from tasks.techniques.init_weights import apply_init, load_init_state
from tasks.techniques.loader import LoaderConfig
from tasks.techniques.models import ModelSpec, build_model, save_model
from tasks.techniques.sampling import MixingSampler
from tasks.techniques.training import (
    EarlyStopping,
    TrainConfig,
    evaluate,
    make_optimizer,
    make_scheduler,
    precision_for,
    train_epoch,
)

CKPT_FILE = "train_state.pt"
ERROR_FILE = "error.json"


def _mlflow_logger(config: dict):
    """Rank 0's per-epoch logger into the stage's MLflow run (None when not tracking).

    A tracking-server outage must not kill training: metrics that cannot be sent stay queued and go
    out with the next epoch's (MLflow's own HTTP retries come first). ``log.flush()`` tries once more
    at the end.
    """
    if not config.get("mlflow_run_id"):
        return None
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=config["mlflow_tracking_uri"])
    pending: list = []

    def flush() -> None:
        try:
            while pending:
                client.log_batch(config["mlflow_run_id"], metrics=pending[:1000])  # MLflow's batch limit
                del pending[:1000]
        except Exception as exc:  # noqa: BLE001 - any tracking failure: keep the metrics, keep training
            print(f"[optforge] could not send {len(pending)} metric(s) to MLflow, retrying next epoch: {exc}")

    def log(metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        pending.extend(Metric(k, float(v), now, step) for k, v in metrics.items())
        flush()

    log.flush = flush
    return log


def train_dataset(config: dict, cfg: TrainConfig, splits: Splits, device) -> tuple[Dataset, object]:
    """``(dataset, loss_fn)`` over the old train split followed by data.new_source's train part.

    Distillation adds the teacher's logits as a third column and its own loss; augmentation swaps the
    features for augmented copies (cached or computed per sample), keeping the other columns.
    """
    X, y = torch.as_tensor(splits.X_fit), torch.as_tensor(splits.y_fit)
    dataset, loss_fn = TensorDataset(X, y), None  # cross-entropy on labels
    if config.get("kd"):  # distillation: the teacher's logits ride along as a third column
        from tasks.distill_worker import kd_dataset_and_loss

        dataset, loss_fn = kd_dataset_and_loss(config["kd"], X, y, device)
    if cfg.loader.augment_copies:
        rest = list(dataset.tensors[1:])
        if config.get("augment_path"):
            dataset = CachedCopies(config["augment_path"], rest)
        else:
            dataset = AugmentedDataset(X.numpy(), rest, cfg.loader, splits.image_shape, cfg.seed)
    return dataset, loss_fn


def make_loader(dataset: Dataset, sampler, batch_size: int, loader: LoaderConfig) -> DataLoader:
    """A DataLoader with ``train.loader``'s settings (prefetch_factor only where torch accepts it)."""
    extra = {"prefetch_factor": loader.prefetch_factor} if loader.prefetch_factor else {}
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=loader.workers,
                      pin_memory=loader.pin_memory, persistent_workers=loader.persistent_workers, **extra)


def train_loop_per_worker(config: dict) -> None:
    """Runs in every Ray Train worker. ``config``: train (dict), spec (dict), data_path, mlflow ids; optional
    ``init_path`` (a model folder to fine-tune from), ``augment_path`` (cached augmented copies) and, for
    distillation, ``kd`` (see ``tasks.distill_worker.kd_dataset_and_loss``)."""
    cfg = TrainConfig.from_dict(config["train"])
    torch.set_num_threads(cfg.threads_per_worker)
    torch.manual_seed(cfg.seed)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()

    splits = load_splits(config["data_path"])
    spec = ModelSpec(**config["spec"])
    base = build_model(spec)
    if config.get("init_path"):  # fine-tuning: before DDP, which broadcasts rank 0's weights
        apply_init(base, load_init_state(config["init_path"], spec, cfg.init_from))
    averaging = cfg.strategy == "model_averaging"
    # ssgd: DDP all-reduces gradients every step. model_averaging: no DDP; ModelAverager all-reduces
    # the weights every cfg.local_steps optimizer steps instead. gradient_as_bucket_view: the gradients
    # live in DDP's buckets, which saves a copy of every gradient per step (bench/ddp_overhead.py on the
    # teacher MLP, 2 processes vs 1: 1.44-1.52x -> 1.60-1.66x with per-tensor AdamW, 1.14x -> 1.17x fused).
    model = ray.train.torch.prepare_model(base, parallel_strategy=None if averaging else "ddp",
                                          parallel_strategy_kwargs={"gradient_as_bucket_view": True})
    dataset, loss_fn = train_dataset(config, cfg, splits, device)
    sampler = MixingSampler(len(splits.y_train), len(splits.y_new), cfg.mix, cfg.tail_fraction, world, rank, cfg.seed)
    loader = make_loader(dataset, sampler, cfg.batch_size, cfg.loader)
    steps_per_epoch = -(-len(loader) // cfg.grad_accum_steps)

    opt = make_optimizer(model, cfg)
    sched = make_scheduler(opt, cfg, steps_per_epoch)
    precision = precision_for(device, cfg.amp)
    stopper = EarlyStopping(cfg.patience, cfg.min_delta)
    best_state = copy.deepcopy(base.state_dict())
    start_epoch, done = 0, False

    checkpoint = ray.train.get_checkpoint()
    state = None
    if checkpoint:
        with checkpoint.as_directory() as d:
            # An error checkpoint (see _report_error) holds no training state: start afresh.
            if (Path(d) / CKPT_FILE).exists():
                state = torch.load(Path(d) / CKPT_FILE, map_location=device, weights_only=True)
    if state:
        base.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if precision.scaler and state.get("scaler"):
            precision.scaler.load_state_dict(state["scaler"])
        stopper.load_state_dict(state["early_stopping"])
        best_state = state["best_model"]
        start_epoch, done = state["epoch"] + 1, state["done"]

    log = _mlflow_logger(config) if rank == 0 else None
    averager = ModelAverager(base, cfg.local_steps) if averaging else None
    if averager:
        averager.average()  # start from identical weights (DDP would have broadcast them)
    if log and start_epoch == 0:
        # The starting point's loss: a fresh model's ~ln(classes), a fine-tuned one's much lower.
        first = evaluate(base, splits.X_val, splits.y_val, device=device)
        log({"initial_val_loss": first["loss"], "initial_val_accuracy": first["accuracy"]}, step=0)
    no_sync = model.no_sync if world > 1 and not averaging else None
    epoch = start_epoch - 1
    for epoch in range(start_epoch, 0 if done else cfg.epochs):
        sampler.set_epoch(epoch)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        t0 = time.perf_counter()
        try:
            stats = train_epoch(model, loader, opt, sched, precision, cfg.grad_accum_steps, no_sync, device, loss_fn,
                                after_step=averager.after_step if averager else None)
            if averager:
                averager.average()  # every rank evaluates and checkpoints the same weights
        except FloatingPointError as exc:
            # Deterministic: every rank raises at the same step (see train_epoch). Report instead of
            # raising, so Ray Train's failure handling does not restart a run that would fail again.
            _report_error(f"epoch {epoch}: {exc}", rank)
            return
        seconds = time.perf_counter() - t0
        # Every rank evaluates the full validation set with identical weights, so all ranks reach the
        # same early-stopping decision without another collective.
        val = evaluate(base, splits.X_val, splits.y_val, device=device)
        if stopper.update(val["accuracy"], epoch):
            best_state = copy.deepcopy(base.state_dict())
        metrics = {
            "train_loss": stats["loss"], "train_accuracy": stats["accuracy"], "val_loss": val["loss"],
            "val_accuracy": val["accuracy"], "samples_per_s": stats["samples"] * world / seconds,
            "lr": sched.get_last_lr()[0], "epoch_seconds": seconds, "epoch": epoch,
            **({"averaging_rounds": averager.rounds} if averager else {}),
        }
        stop = stopper.should_stop or epoch + 1 == cfg.epochs
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
    if log:
        log.flush()


def _report(metrics: dict, state: dict, rank: int, spec: ModelSpec, final_model: dict | None) -> None:
    """All ranks report; rank 0 attaches the checkpoint (training state, plus the best model at the end)."""
    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
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


def ensure_ray() -> None:
    """Join ``RAY_ADDRESS``'s cluster when set, else start a local Ray (once per process).

    A local Ray advertises 127.0.0.1, so its processes talk over loopback rather than the machine's
    network address (Ray's gRPC servers still listen on every interface; Ray offers no switch for that).
    """
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS") or None
    local = {} if address and address != "local" else {"_node_ip_address": "127.0.0.1"}
    ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False, **local)


def latest_checkpoint(storage: Path, name: str) -> ray.train.Checkpoint | None:
    """The newest checkpoint a previous (crashed) run of the same name left in ``storage``.

    Ray Train v2 restores such a run by itself (from ``checkpoint_manager_snapshot.json`` under the
    same name and storage path); we look only to record whether this run resumes.
    """
    folder = storage / name
    found = sorted(folder.glob("checkpoint_*/" + CKPT_FILE), key=lambda p: p.stat().st_mtime)
    return ray.train.Checkpoint.from_directory(str(found[-1].parent)) if found else None


def run_training(
    cfg: TrainConfig, spec: ModelSpec, data_path: str, storage: Path, name: str, out_dir: Path,
    mlflow_tracking_uri: str | None = None, mlflow_run_id: str | None = None, extra_config: dict | None = None,
) -> dict:
    """Launch the TorchTrainer; copy the best model into ``out_dir``; return the last metrics.

    ``name`` is derived from the cache key, so re-running the same stage after a crash finds the
    crashed run's checkpoints and resumes from the newest.
    """
    # Ray Train v2's controller polls workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (default 2 s) and
    # each ray.train.report waits for that poll: with 0.25 s an epoch of this size costs ~0.3 s of
    # reporting instead of 2 s. The driver's value reaches the controller when the trainer is made.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
    extra_config = dict(extra_config or {})
    if cfg.loader.augment_copies and cfg.loader.cache:
        # Built once by the driver, before any worker starts; workers of every strategy memory-map it.
        splits = load_splits(data_path)
        extra_config["augment_path"] = str(
            build_cache(splits.X_fit, cfg.loader, splits.image_shape, cfg.seed, cache_path(data_path, cfg.loader, cfg.seed)))
    if cfg.strategy == "asgd":  # no collective at all: a parameter server on plain Ray actors
        from tasks.asgd_worker import run_asgd

        return run_asgd(cfg, spec, data_path, storage, name, out_dir, mlflow_tracking_uri, mlflow_run_id, extra_config)
    ensure_ray()
    from ray.train.torch import TorchTrainer

    resumed = latest_checkpoint(storage, name) is not None
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "train": cfg.to_dict(), "spec": asdict(spec), "data_path": data_path,
            "mlflow_tracking_uri": mlflow_tracking_uri, "mlflow_run_id": mlflow_run_id, **extra_config,
        },
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


def training_summary(state: dict, resumed: bool, metrics: dict) -> dict:
    """What every strategy's run returns, from its final training state (``early_stopping``, ``epoch``)."""
    return {
        "best_val_accuracy": state["early_stopping"]["best"], "best_epoch": state["early_stopping"]["best_epoch"],
        "epochs_run": state["epoch"] + 1, "resumed": resumed, "metrics": metrics,
    }
