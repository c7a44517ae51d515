"""Asynchronous SGD (``train.strategy: asgd``): a parameter-server Ray actor and worker actors that never wait
for each other.

Each worker loops: take a unit of work and the newest weights from the server, compute the gradient,
push it back tagged with the weight version it was computed on, and get the next unit and weights in
the same call (``tasks.techniques.training.param_server`` holds the logic; this module is the Ray wiring).
A slow worker just takes fewer units; a worker that dies is counted and its unit handed to another;
the run fails only when no worker is left.

The server checkpoints itself at every epoch end into ``storage / name / checkpoint_NNNNNN`` (the
layout ``tasks.workers.train_worker.latest_checkpoint`` reads), so a re-run of the same stage resumes. The
driver polls the server for finished epochs and logs them to MLflow itself: a slow tracking server
then delays only the log lines, never the server's replies to workers.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import ray
import torch
from ray.exceptions import RayActorError, RayTaskError
from torch.utils.data import default_collate

from optforge.tasks.techniques.contract import forward_logits, to_device
from optforge.tasks.techniques.data.data import load_splits
from optforge.tasks.techniques.files import atomic_write
from optforge.tasks.techniques.models.init_weights import apply_init, load_init_state
from optforge.tasks.techniques.models.models import save_model
from optforge.tasks.techniques.models.rebuild import build_model
from optforge.tasks.techniques.training.param_server import ParameterServer, Push, Reply, Work
from optforge.tasks.techniques.training.training import Precision, evaluate, precision_for
from optforge.tasks.workers.worker_common import (
    CKPT_FILE,
    PartDataset,
    WorkerConfig,
    ensure_ray,
    latest_checkpoint,
    mlflow_logger,
    train_dataset,
    training_summary,
)

POLL_S = 0.25  # how often the driver checks for finished epochs and dead workers
KEEP_CHECKPOINTS = 2


def actor_name(name: str, role: str) -> str:
    """The Ray actor name of ``role`` ("server", "worker-0", ...) in the run ``name``: unique per run, so that
    concurrent stages do not collide and a test can find a worker with ``ray.get_actor``."""
    return f"optforge-asgd-{name}-{role}"


@ray.remote
class ParameterServerActor:
    """``ParameterServer`` in an actor; writes a checkpoint at every epoch end and queues the epoch's metrics.

    Calls run one at a time (a plain actor), so every update and handout sees a consistent state.
    """

    def __init__(self, worker: WorkerConfig, checkpoint_dir: str, resume_from: str | None):
        torch.set_num_threads(1)  # num_cpus=0: it shares a CPU with the workers; its work is one step per push
        self.cfg = worker.train_cfg
        splits = load_splits(worker.data_path)
        torch.manual_seed(self.cfg.seed)
        model = build_model(worker.model_spec)
        if worker.init_path and not resume_from:
            apply_init(model, load_init_state(worker.init_path, worker.model_spec))
        self.checkpoint_dir = Path(checkpoint_dir)
        self.pending: list[dict] = []
        val = splits.val
        self.core = ParameterServer(
            model, self.cfg, len(splits.train), len(splits.new), lambda m: evaluate(m, val),
            self.cfg.num_workers, on_epoch_end=self._epoch_end,
        )
        if resume_from:
            self.core.load_state_dict(torch.load(resume_from, map_location="cpu", weights_only=True))
        self.initial = evaluate(model, val)

    def next(self, worker: int, push: Push | None) -> Reply:
        return self.core.next(worker, push)

    def worker_lost(self, worker: int) -> None:
        self.core.worker_lost(worker)

    def stop(self, reason: str) -> None:
        self.core.stop(reason)

    def status(self) -> dict:
        """Progress for the driver and for tests: version, epoch, done, error, per-worker counts."""
        core = self.core
        return {"version": core.version, "epoch": core.epoch, "done": core.done, "error": core.error,
                "nonfinite": core.nonfinite, "initial": self.initial, "totals": core.totals()}

    def drain(self) -> list[dict]:
        """The metrics of the epochs that ended since the last call."""
        out, self.pending = self.pending, []
        return out

    def result(self) -> dict:
        return {"best_model": self.core.best_model, "early_stopping": self.core.stopper.state_dict(),
                "epoch": self.core.epoch - 1, "metrics": self.core.history[-1] if self.core.history else {},
                "totals": self.core.totals()}

    def _epoch_end(self, record: dict) -> None:
        self.pending.append(record)
        state = self.core.state_dict()
        path = self.checkpoint_dir / f"checkpoint_{record['epoch']:06d}" / CKPT_FILE
        atomic_write(path, lambda tmp: torch.save(state, tmp))
        for old in sorted(self.checkpoint_dir.glob("checkpoint_*"))[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(old, ignore_errors=True)


@ray.remote
class AsgdWorker:
    """Computes gradients for the server until it says stop.

    ``delay_s`` sleeps that many seconds per micro-batch: it exists only so that tests and the benchmark
    can make one worker artificially slow.
    """

    def __init__(self, index: int, worker: WorkerConfig, delay_s: float = 0.0):
        self.index, self.delay_s = index, delay_s
        self.cfg = worker.train_cfg
        torch.set_num_threads(self.cfg.threads_per_worker)
        torch.manual_seed(self.cfg.seed + index)  # dropout masks differ between workers
        self.device = torch.device("cuda" if self.cfg.use_gpu and torch.cuda.is_available() else "cpu")
        self.precision = precision_for(self.device, self.cfg.amp)
        if self.precision.scaler is not None:
            # fp16 on CUDA would need a GradScaler, whose loss scale is checked and adjusted around the
            # optimizer step, and that step runs on the remote server. bf16 has fp32's range: no scaler.
            self.precision = Precision(self.device.type, torch.bfloat16, None)
        # The dataset is the old train split followed by data.new_source's train part, the index
        # convention of ``epoch_order``; with ``kd`` it carries the teacher's logits too.
        self.dataset, loss_fn = train_dataset(worker, self.cfg, load_splits(worker.data_path), self.device)
        self.loss_fn = loss_fn or torch.nn.functional.cross_entropy
        self.model = build_model(worker.model_spec).to(self.device)

    def run(self, server) -> int:
        """The worker loop; returns the number of units it computed."""
        reply: Reply = ray.get(server.next.remote(self.index, None))
        units = 0
        while reply.work is not None:
            self.model.load_state_dict(reply.weights)
            push = self._gradient(reply.work, reply.version)
            units += 1
            reply = ray.get(server.next.remote(self.index, push))
        return units

    def _gradient(self, work: Work, version: int) -> Push:
        model, n = self.model, len(work.batches)
        model.train()
        model.zero_grad(set_to_none=True)
        if hasattr(self.dataset, "set_epoch"):  # augmented copies change with the epoch
            self.dataset.set_epoch(work.epoch)
        loss_sum, correct, seen = 0.0, 0, 0
        for idx in work.batches:
            if self.delay_s:
                time.sleep(self.delay_s)
            xb, yb, *extra = self._batch(idx)
            xb, yb = to_device(xb, self.device), yb.to(self.device)
            extra = [to_device(e, self.device) if isinstance(e, dict) else e.to(self.device) for e in extra]
            with self.precision.autocast():
                logits = forward_logits(model, xb)
            loss = self.loss_fn(logits.float(), yb, *extra)
            (loss / n).backward()  # the pushed gradient is the mean over the unit's micro-batches
            loss_sum += loss.item() * len(yb)
            correct += int((logits.argmax(1) == yb).sum())
            seen += len(yb)
        grads = {k: (p.grad if p.grad is not None else torch.zeros_like(p)).detach().cpu()
                 for k, p in model.named_parameters()}
        buffers = {k: b.detach().cpu() for k, b in model.named_buffers()}
        return Push(version, grads, buffers, loss_sum, correct, seen)

    def _batch(self, idx: np.ndarray) -> list:
        if isinstance(self.dataset, PartDataset) and not self.dataset.extra:  # one vectorised read, not N
            part = self.dataset.part
            inputs = {k: torch.from_numpy(v) for k, v in part.take(idx).items()}
            return [inputs, torch.as_tensor(np.asarray(part.labels[idx]))]
        return default_collate([self.dataset[i] for i in idx.tolist()])


def run_asgd(worker: WorkerConfig, storage: Path, name: str, out_dir: Path,
             worker_delays_s: dict[int, float] | None = None, progress=None) -> dict:
    """Train with asynchronous SGD on Ray actors; write the best model to ``out_dir``; return the summary.

    Args:
        worker: what every actor reads: the training config (``num_workers`` workers of one CPU each,
            ``staleness_bound``), the model spec, the split folder, the MLflow run, and optional
            ``init_path`` (ignored when resuming) and ``kd``.
        storage, name: checkpoints go to ``storage / name``; a re-run with the same name resumes from them.
        out_dir: where the best model is saved (``save_model``).
        worker_delays_s: {worker index: seconds slept per micro-batch}: only for tests and benchmarks that
            need an artificially slow worker.
        progress: a ``tasks.runtime.progress.ProgressFeed``, told about each finished epoch (None: silent).

    Returns:
        The shape of ``run_training``'s summary; ``metrics`` holds the last epoch's metrics overlaid with
        whole-run asgd statistics (staleness_mean, staleness_max, stale_dropped, workers_lost, updates,
        samples_per_s, updates_worker_<i>, units_worker_<i>).

    Raises:
        FloatingPointError: a worker's gradient became non-finite.
        RuntimeError: every worker died before training ended.
    """
    cfg, spec = worker.train_cfg, worker.model_spec
    ensure_ray()
    found = latest_checkpoint(storage, name)
    resume_from = str(Path(found.path) / CKPT_FILE) if found else None
    log = mlflow_logger(worker)
    delays = worker_delays_s or {}
    server = ParameterServerActor.options(name=actor_name(name, "server"), num_cpus=0).remote(
        worker, str(storage / name), resume_from)
    # Workers start alongside the server (each actor is a fresh process importing torch, which takes
    # seconds); when a resumed run turns out to be finished, their first call already answers "stop".
    workers = [
        AsgdWorker.options(name=actor_name(name, f"worker-{i}"), num_cpus=1, num_gpus=int(cfg.use_gpu))
        .remote(i, replace(worker, init_path=None), float(delays.get(i, 0.0)))
        for i in range(cfg.num_workers)
    ]
    try:
        loops = {w.run.remote(server): i for i, w in enumerate(workers)}
        first = ray.get(server.status.remote())["initial"]  # also raises the server's start-up error, if any
        if log and not found:
            log({"initial_val_loss": first["loss"], "initial_val_accuracy": first["accuracy"],
                 "staleness_bound": cfg.staleness_bound}, step=0)
        _supervise(server, loops, log, progress)
        result = ray.get(server.result.remote())
    finally:
        for actor in [*workers, server]:
            ray.kill(actor, no_restart=True)
        _wait_names_free([actor_name(name, "server")] + [actor_name(name, f"worker-{i}") for i in range(len(workers))])
    if log:
        log.flush()
    model = build_model(spec)
    model.load_state_dict(result["best_model"])
    save_model(model, spec, out_dir)
    return training_summary(result, found is not None, {**result["metrics"], **result["totals"]})


def _supervise(server, loops: dict, log, progress=None) -> None:
    """Wait for every worker loop; count dead workers, log finished epochs; raise when training cannot go on."""
    pending, lost, failure, death = list(loops), 0, None, None
    while pending:
        ready, pending = ray.wait(pending, num_returns=1, timeout=POLL_S)
        for ref in ready:
            i = loops[ref]
            try:
                ray.get(ref)
            except RayTaskError as exc:  # raised inside the worker (a bug, a NaN, the server gone): stop everyone
                failure = failure or exc
                ray.get(server.stop.remote(f"worker {i} failed: {exc}"))
            except RayActorError as exc:
                if exc.actor_init_failed:  # its __init__ raised: every worker would, so this is no death to ride out
                    failure = failure or exc
                    ray.get(server.stop.remote(f"worker {i} failed to start: {exc}"))
                    continue
                lost, death = lost + 1, exc  # the worker process died: the others carry on
                print(f"[optforge] asgd worker {i} died ({type(exc).__name__}); {len(loops) - lost} left")
                ray.get(server.worker_lost.remote(i))
        _log_epochs(server, log, progress)
    status = ray.get(server.status.remote())
    if failure is not None:
        if status["nonfinite"]:
            raise FloatingPointError(f"training stopped: {status['error']}")
        raise failure
    if not status["done"]:
        raise RuntimeError(
            f"asgd: all {len(loops)} workers died before training ended (epoch {status['epoch']})") from death


def _log_epochs(server, log, progress=None) -> None:
    for record in ray.get(server.drain.remote()):
        if log:
            log({k: v for k, v in record.items() if k != "epoch"}, step=int(record["epoch"]))
        if progress is not None:
            progress.epoch(int(record["epoch"]), record)


def _wait_names_free(names: list[str], timeout_s: float = 10.0) -> None:
    """ray.kill returns before the actor is gone; wait until its name is free, so a re-run can take it."""
    deadline = time.monotonic() + timeout_s
    for n in names:
        while time.monotonic() < deadline:
            try:
                ray.get_actor(n)
            except ValueError:
                break
            time.sleep(0.05)
