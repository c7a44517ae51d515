"""Live progress of the training stages: every epoch (and, in a long epoch, its steps) shown as it happens.

A training loop reports through a ``ProgressFeed``. On Ray Train workers only rank 0 has one, and it puts
small dict events on a Ray queue; the driver's ``StageProgress`` drains that queue in a thread. Loops
that run in the driver (the asgd supervisor, in-process fine-tuning) feed ``StageProgress`` directly.
Either way each event becomes:

- one log line through Prefect's run logger, which shows it in the terminal and keeps it in the Prefect
  UI's logs for the task run (``train: epoch 3/40  train_loss 0.412  val_accuracy 91.30  [7 s, ~74 s left]``);
- the percentage of a Prefect progress artifact on the flow run (``<stage>-progress``).

Lines rather than a redrawn bar: Prefect's own log lines interleave with a bar on the same terminal, and
lines survive in CI logs and the Prefect UI. Progress never breaks training: a feed that cannot send
drops the event.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

# Callbacks that also see every finished epoch of this process's training stages (``epoch_listener``).
_LISTENERS: list[Callable[[str, dict], None]] = []
STEP_EVERY_S = 10.0  # within an epoch, report steps at most this often (short epochs report none)
SHOWN_METRICS = ("train_loss", "val_loss", "val_accuracy")


class ProgressFeed:
    """What a training loop reports: each finished epoch, and within an epoch a step at most every ``every_s``."""

    def __init__(self, send: Callable[[dict], None], epochs: int, every_s: float = STEP_EVERY_S):
        self.send, self.epochs, self.every_s = send, epochs, every_s
        self._last = time.monotonic()

    @classmethod
    def to_queue(cls, queue, epochs: int, every_s: float = STEP_EVERY_S) -> ProgressFeed:
        """A feed onto the driver's Ray queue (from ``StageProgress.remote_queue``), used by Ray workers."""
        return cls(queue_sender(queue), epochs, every_s)

    def batch(self, epoch: int, done: int, total: int) -> None:
        """After each batch: sends a step event when ``every_s`` has passed since the last event."""
        now = time.monotonic()
        if now - self._last >= self.every_s and done < total:
            self._last = now
            self.send({"kind": "step", "epoch": epoch, "epochs": self.epochs, "done": done, "total": total})

    def epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        """After each epoch (0-based ``epoch``) with its metrics."""
        self._last = time.monotonic()
        shown = {k: float(metrics[k]) for k in SHOWN_METRICS if k in metrics}
        self.send({"kind": "epoch", "epoch": epoch, "epochs": self.epochs, "metrics": shown})


def queue_sender(queue) -> Callable[[dict], None]:
    """``send(event)`` onto a Ray queue that drops the event when it cannot be sent (the driver is gone or the
    queue is full): reporting never breaks training."""

    def send(event: dict) -> None:
        try:
            queue.put_nowait(event)
        except Exception:
            pass

    return send


@contextlib.contextmanager
def epoch_listener(callback: Callable[[str, dict], None]) -> Iterator[None]:
    """Call ``callback(label, event)`` for every epoch any ``StageProgress`` in this process shows, inside the
    block: a tune trial forwards each fine-tuning epoch's validation accuracy to its early-stopping scheduler."""
    _LISTENERS.append(callback)
    try:
        yield
    finally:
        _LISTENERS.remove(callback)


class StageProgress:
    """The driver's side for one training stage (a context manager): shows events, keeps the artifact current."""

    def __init__(self, label: str, epochs: int, logger: logging.Logger | logging.LoggerAdapter | None = None):
        self.label, self.epochs = label, epochs
        self.logger = logger or _run_logger()
        self.lines: list[str] = []  # what was shown, in order (the tests read it)
        self._artifact = None
        self._queue = None
        # Where the ranks' own events (hello, beat, finished: ``tasks.workers.watchdog``) go; they are not shown.
        self.on_rank_event: Callable[[dict], None] | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._started = time.monotonic()
        self._first: tuple[float, float] | None = None  # (time, share done) of the first event

    def __enter__(self) -> StageProgress:
        self._started = time.monotonic()
        self._artifact = _create_artifact(self.label, self.epochs)
        return self

    def feed(self) -> ProgressFeed:
        """A feed for a loop running in this process."""
        return ProgressFeed(self.show, self.epochs)

    def remote_queue(self):
        """A Ray queue for Ray workers, drained here in a thread: rank 0's ``ProgressFeed.to_queue`` events are
        shown, every rank's ``tasks.workers.watchdog.Heartbeat`` events go to ``on_rank_event``."""
        from ray.util.queue import Queue

        self._queue = Queue(maxsize=10_000, actor_options={"num_cpus": 0})
        self._thread = threading.Thread(target=self._drain, name=f"optforge-progress-{self.label}", daemon=True)
        self._thread.start()
        return self._queue

    def _drain(self) -> None:
        from ray.util.queue import Empty

        while True:
            try:
                event = self._queue.get(block=True, timeout=0.5)
                if "rank" not in event:
                    self.show(event)
                elif self.on_rank_event is not None:
                    self.on_rank_event(event)
            except Empty:
                if self._stop.is_set():
                    return
            except Exception:  # the queue's actor is gone (Ray shut down): nothing more will come
                return

    def show(self, event: dict) -> None:
        """One event as a log line and as the artifact's percentage."""
        done = event["epoch"] + (event["done"] / event["total"] if event["kind"] == "step" else 1)
        share, now = min(1.0, done / max(1, event["epochs"])), time.monotonic()
        timing = f"{now - self._started:.0f} s"
        if self._first is None:  # the rate is taken from the first event on, so start-up time does not skew it
            self._first = (now, share)
        elif share > self._first[1] and share < 1:
            rate = (now - self._first[0]) / (share - self._first[1])
            timing += f", ~{rate * (1 - share):.0f} s left"
        head = f"{self.label}: epoch {event['epoch'] + 1}/{event['epochs']}"
        if event["kind"] == "step":
            line = f"{head}  step {event['done']}/{event['total']}  [{timing}]"
        else:
            shown = "  ".join(f"{k} {v:.4g}" if k.endswith("loss") else f"{k} {v:.2f}" for k, v in event["metrics"].items())
            line = f"{head}  {shown}  [{timing}]"
        self.lines.append(line)
        self.logger.info(line)
        if event["kind"] == "epoch":
            for listener in _LISTENERS.copy():  # a listener may leave while we call
                listener(self.label, event)
        _update_artifact(self._artifact, 100 * share, line)

    def __exit__(self, exc_type, exc, tb) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._queue is not None:
            try:
                self._queue.shutdown()
            except Exception:
                pass
        if exc_type is None:
            _update_artifact(self._artifact, 100.0, f"{self.label}: done in {time.monotonic() - self._started:.0f} s")


def _run_logger() -> logging.Logger | logging.LoggerAdapter:
    """Prefect's run logger inside a flow or task run (terminal + Prefect UI), else the ``optforge`` logger."""
    try:
        from prefect import get_run_logger

        return get_run_logger()
    except Exception:  # outside a Prefect run (a test calling the function directly)
        return logging.getLogger("optforge")


def _create_artifact(label: str, epochs: int) -> Any:
    """A Prefect progress artifact on the current run, or None outside one (or if the API refuses)."""
    try:
        from prefect.artifacts import create_progress_artifact
        from prefect.context import get_run_context

        get_run_context()  # raises outside a flow or task run
        key = re.sub(r"[^a-z0-9-]+", "-", f"{label}-progress".lower())  # Prefect keys: lowercase letters, digits, dashes
        return create_progress_artifact(0.0, key=key, description=f"{label}: {epochs} epoch(s)")
    except Exception:
        return None


def _update_artifact(artifact_id, percent: float, description: str) -> None:
    if artifact_id is None:
        return
    try:
        from prefect.artifacts import update_progress_artifact

        update_progress_artifact(artifact_id, percent, description=description)
    except Exception:  # the artifact is a convenience: never fail training over it
        pass
