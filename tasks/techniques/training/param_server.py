"""Asynchronous SGD's parameter server: the weights, the optimizer, the staleness bound and the work handout.

Plain PyTorch, no Ray: ``tasks/workers/asgd_worker.py`` wraps one ``ParameterServer`` in a Ray actor and runs
workers that call ``next(worker, push)`` in a loop; the tests drive it directly with a toy model.

One call does everything a worker needs, so a worker never waits for another worker, only for its
own round trip: the server applies the pushed gradient, then hands out the next unit of work
together with the newest weights and their version.

* **Staleness.** A gradient computed on weights of version ``v`` that arrives when the server is at
  version ``V`` is ``V - v`` updates old. It is applied only when that is at most
  ``cfg.staleness_bound``; older ones are dropped and counted, since a very stale gradient points
  the weights somewhere they no longer are.
* **Work stealing.** Each epoch's order is ``sampling.epoch_order`` (old samples, then new ones,
  mixed by ``cfg.mix``), cut into ``cfg.batch_size`` micro-batches; a unit of work is
  ``cfg.grad_accum_steps`` of them and becomes one update. Whoever asks next gets the next unit, so
  a slow worker simply takes fewer units.
* **Epoch ends.** An epoch ends at the first request after its last unit was handed out: that
  request's gradient is in, the (at most ``workers - 1``) units still being computed elsewhere
  count towards the next epoch. Waiting for them would let the slowest worker stall everyone.
  Evaluation, early stopping and ``on_epoch_end`` (the actor's checkpoint) run right then. Once
  training is done, gradients still in flight are ignored, so the final weights equal the final
  checkpoint's.
* **Lost workers.** ``worker_lost`` puts the unit a dead worker held back in the queue, so its
  samples are still trained this epoch by someone else.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from optforge.tasks.techniques.data.sampling import epoch_order
from optforge.tasks.techniques.training.training import (
    EarlyStopping,
    TrainConfig,
    all_finite,
    make_optimizer,
    make_scheduler,
)

Validate = Callable[[nn.Module], dict[str, float]]  # model -> {"loss", "accuracy" (%)} on the validation set


@dataclass
class Work:
    """One unit of work: up to ``grad_accum_steps`` micro-batches of sample indices (old then new data)."""

    epoch: int
    batches: list[np.ndarray]


@dataclass
class Push:
    """A worker's accumulated gradient (mean over its micro-batches), tagged with the weight version it used."""

    version: int
    grads: dict[str, torch.Tensor]
    # Buffers after the forward passes (BatchNorm statistics): the server keeps the latest applied ones.
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)
    loss_sum: float = 0.0  # summed over samples
    correct: int = 0
    seen: int = 0


@dataclass
class Reply:
    """What a worker gets back: the newest weights and their version, and its next unit (None: stop)."""

    version: int
    weights: dict[str, torch.Tensor] | None
    work: Work | None


@dataclass
class StalenessStats:
    """Staleness of every gradient received (applied or dropped), and how many the bound dropped."""

    received: int = 0
    applied: int = 0
    dropped: int = 0
    total: int = 0  # sum of staleness, in updates
    max: int = 0

    def add(self, staleness: int, applied: bool) -> None:
        self.received += 1
        self.applied += applied
        self.dropped += not applied
        self.total += staleness
        self.max = max(self.max, staleness)

    def metrics(self) -> dict[str, float]:
        return {"staleness_mean": self.total / max(1, self.received), "staleness_max": float(self.max),
                "stale_dropped": float(self.dropped)}


class ParameterServer:
    """Holds the model and its optimizer; applies pushed gradients within the staleness bound; hands out work.

    Args:
        model: the model being trained (its parameters are updated in place).
        cfg: the training config (optimizer, schedule, batch size, accumulation, epochs, early stopping,
            staleness bound, data mixing and seed).
        n_old: training samples of the original data (indices ``0 .. n_old-1``).
        n_new: training samples of ``data.new_source`` (indices after the old ones); 0 without it.
        validate: computes validation loss and accuracy of a model, called at every epoch end.
        num_workers: workers that will call ``next`` (for the ``workers_alive`` metric).
        on_epoch_end: called with the epoch's metrics right after the epoch ends, when ``state_dict``
            describes exactly that moment (the Ray actor writes its checkpoint there).
    """

    def __init__(self, model: nn.Module, cfg: TrainConfig, n_old: int, n_new: int, validate: Validate,
                 num_workers: int = 1, on_epoch_end: Callable[[dict], None] | None = None):
        if n_old + n_new < 1:
            raise ValueError("data: the training split is empty")
        epoch_order(n_old, n_new, cfg.mix, cfg.tail_fraction, 0, cfg.seed)  # a bad train.tail_fraction fails here
        self.model, self.cfg, self.n_old, self.n_new = model, cfg, n_old, n_new
        self.validate, self.num_workers, self.on_epoch_end = validate, num_workers, on_epoch_end
        self.params = dict(model.named_parameters())
        micro_batches = -(-(n_old + n_new) // cfg.batch_size)
        self.units_per_epoch = -(-micro_batches // cfg.grad_accum_steps)  # = updates per epoch, none dropped
        self.opt = make_optimizer(model, cfg)
        self.sched = make_scheduler(self.opt, cfg, self.units_per_epoch)
        self.stopper = EarlyStopping(cfg.patience, cfg.min_delta)
        self.best_model = _clone(model.state_dict())
        self.version = 0  # updates applied so far
        self.epoch = 0  # the epoch being handed out
        self.done = False
        self.error: str | None = None  # why training stopped early (a non-finite gradient, a failed worker)
        self.nonfinite = False  # the error is a non-finite gradient
        self.stats = StalenessStats()  # whole run
        self.applied_by_worker: dict[int, int] = {}
        self.units_by_worker: dict[int, int] = {}  # gradients received, applied or not
        self.lost: set[int] = set()
        self.history: list[dict] = []  # each epoch's metrics, in order
        self._order: np.ndarray | None = None
        self._pos = 0
        self._outstanding: dict[int, Work] = {}
        self._requeue: list[Work] = []
        self._reset_window()
        self.samples_seen = 0  # this process only (not checkpointed): for the run's samples_per_s
        self._t_start: float | None = None

    # -- the worker protocol ------------------------------------------------------------------------------------
    def next(self, worker: int, push: Push | None = None) -> Reply:
        """Apply ``worker``'s gradient (if any), then hand it the next unit with the newest weights.

        Raises:
            FloatingPointError: the pushed gradient is not finite (every later call answers "stop").
        """
        if self._t_start is None:  # the first worker is here: clocks start now, not when the server was built
            self._t_start = self._epoch_t0 = time.perf_counter()
        if push is not None:
            self._outstanding.pop(worker, None)
            self.receive(worker, push)
        if self.done or self.error is not None or worker in self.lost:
            return Reply(self.version, None, None)
        if self._epoch_exhausted():
            self._end_epoch()
            if self.done:
                return Reply(self.version, None, None)
        return Reply(self.version, self.weights(), self._handout(worker))

    def receive(self, worker: int, push: Push) -> bool:
        """Apply ``push`` when it is fresh enough; return whether it was applied."""
        if self.done or self.error is not None:
            return False  # in flight when training ended: the final checkpoint already holds the final weights
        if missing := set(self.params) - set(push.grads):
            raise ValueError(f"gradient from worker {worker} lacks parameters {sorted(missing)[:4]}")
        if not all_finite(push.grads.values()):
            loss = push.loss_sum / max(1, push.seen)
            self.error = (
                f"gradient from worker {worker} became non-finite (its mean loss {loss:.4g}) at update {self.version}; "
                "hint: lower train.lr, raise train.warmup_epochs, or check the data for extreme values"
            )
            self.nonfinite = True
            raise FloatingPointError(self.error)
        staleness = self.version - push.version
        applied = staleness <= self.cfg.staleness_bound
        self.stats.add(staleness, applied)
        self._window.add(staleness, applied)
        self.units_by_worker[worker] = self.units_by_worker.get(worker, 0) + 1
        self._train[0] += push.loss_sum
        self._train[1] += push.correct
        self._train[2] += push.seen
        self.samples_seen += push.seen
        self._t_last = time.perf_counter()
        if applied:
            for name, p in self.params.items():
                p.grad = push.grads[name].to(device=p.device, dtype=p.dtype)
            self.opt.step()
            self.sched.step()
            self.opt.zero_grad(set_to_none=True)
            if push.buffers:
                self.model.load_state_dict(push.buffers, strict=False)
            self.version += 1
            self.applied_by_worker[worker] = self.applied_by_worker.get(worker, 0) + 1
        return applied

    def worker_lost(self, worker: int) -> None:
        """``worker`` is gone: requeue the unit it held so that its samples are still trained."""
        self.lost.add(worker)
        work = self._outstanding.pop(worker, None)
        if work is not None and not self.done:
            self._requeue.append(work)

    def stop(self, reason: str) -> None:
        """End training early (a worker failed for a reason other than death): every later call answers stop."""
        self.error = self.error or reason

    def weights(self) -> dict[str, torch.Tensor]:
        """A copy of the current ``state_dict`` (a copy: the live tensors change with the next update)."""
        return _clone(self.model.state_dict())

    def totals(self) -> dict[str, float]:
        """Whole-run statistics: staleness, updates, samples per second, and per-worker counts."""
        seconds = (self._t_last - self._t_start) if self._t_start and self.samples_seen else 0.0
        out = {**self.stats.metrics(), "updates": float(self.version), "workers_lost": float(len(self.lost)),
               "samples_per_s": self.samples_seen / seconds if seconds > 0 else 0.0}
        for w in sorted(set(self.units_by_worker) | set(self.applied_by_worker)):
            out[f"updates_worker_{w}"] = float(self.applied_by_worker.get(w, 0))
            out[f"units_worker_{w}"] = float(self.units_by_worker.get(w, 0))
        return out

    # -- epochs -------------------------------------------------------------------------------------------------
    def _epoch_exhausted(self) -> bool:
        return self._order is not None and self._pos >= len(self._order) and not self._requeue

    def _handout(self, worker: int) -> Work:
        if self._requeue:
            work = self._requeue.pop(0)
        else:
            if self._order is None:
                self._order = epoch_order(self.n_old, self.n_new, self.cfg.mix, self.cfg.tail_fraction, self.epoch,
                                          self.cfg.seed)
                self._pos = 0
            bs = self.cfg.batch_size
            chunk = self._order[self._pos : self._pos + bs * self.cfg.grad_accum_steps]
            self._pos += len(chunk)
            work = Work(self.epoch, [chunk[i : i + bs] for i in range(0, len(chunk), bs)])
        self._outstanding[worker] = work
        return work

    def _end_epoch(self) -> None:
        now = time.perf_counter()
        seconds = now - self._epoch_t0
        val = self.validate(self.model)
        if self.stopper.update(val["accuracy"], self.epoch):
            self.best_model = _clone(self.model.state_dict())
        loss_sum, correct, seen = self._train
        record = {
            "train_loss": loss_sum / max(1, seen), "train_accuracy": 100.0 * correct / max(1, seen),
            "val_loss": val["loss"], "val_accuracy": val["accuracy"], "samples_per_s": seen / max(seconds, 1e-9),
            "lr": self.sched.get_last_lr()[0], "epoch_seconds": seconds, **self._window.metrics(),
            "workers_alive": float(self.num_workers - len(self.lost)), "epoch": self.epoch,
        }
        self.history.append(record)
        self.done = self.stopper.should_stop or self.epoch + 1 >= self.cfg.epochs
        self.epoch += 1
        self._order = None
        self._reset_window(now)
        if self.on_epoch_end is not None:
            self.on_epoch_end(record)

    def _reset_window(self, now: float | None = None) -> None:
        # Train loss/accuracy and staleness of an epoch cover the gradients *received* during it.
        self._window = StalenessStats()
        self._train = [0.0, 0, 0]  # loss sum, correct, samples
        self._epoch_t0 = now if now is not None else time.perf_counter()
        self._t_last = self._epoch_t0

    # -- checkpoints --------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything a resumed run needs, as of the last epoch end (plain tensors and numbers: ``weights_only``)."""
        return {
            "epoch": self.epoch - 1, "done": self.done, "model": _clone(self.model.state_dict()),
            "best_model": self.best_model, "early_stopping": self.stopper.state_dict(),
            "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(), "version": self.version,
            "staleness": asdict(self.stats), "applied_by_worker": dict(self.applied_by_worker),
            "units_by_worker": dict(self.units_by_worker), "metrics": self.history[-1] if self.history else {},
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue after ``state["epoch"]``. ``done`` is decided again with this run's ``cfg``: a re-run with more
        epochs continues training, unless early stopping had already fired."""
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.stopper.load_state_dict(state["early_stopping"])
        self.best_model = state["best_model"]
        self.version = int(state["version"])
        self.stats = StalenessStats(**state["staleness"])
        self.applied_by_worker = {int(k): int(v) for k, v in state["applied_by_worker"].items()}
        self.units_by_worker = {int(k): int(v) for k, v in state["units_by_worker"].items()}
        self.history = [state["metrics"]] if state["metrics"] else []
        self.epoch = int(state["epoch"]) + 1
        self.done = self.stopper.should_stop or self.epoch >= self.cfg.epochs
        self._order, self._pos, self._outstanding, self._requeue = None, 0, {}, []
        self._reset_window()


def _clone(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in state.items()}

