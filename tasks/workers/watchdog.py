"""The training stages' watchdog: a stage whose ranks stop reporting fails, naming them, instead of hanging.

Every Ray Train rank sends small events through the stage's progress queue (``tasks.runtime.progress``): a
``hello`` when its loop starts (rank 0's carries the handle of Ray Train's controller), a ``beat`` at each
phase (training, evaluating, checkpointing) and at most every ``every_s`` within one, and ``finished``
when its loop ends. ``RankWatch`` keeps the last event of each rank, as the driver received it.

A rank that has sent nothing for ``train.stall_timeout_s`` while it has not finished is waiting in a
collective that a peer never joins (the ranks took different paths: one stopped, the other trained on) or
is stuck. ``Watchdog`` then aborts the Ray Train run through its controller and keeps the reason; the
driver raises ``TrainingStalled`` with it, so the task, the MLflow run and the Prefect flow run end
FAILED with a message naming the stage, the epoch and the silent ranks. The checkpoints stay in Ray
Train's storage: the next run of the stage resumes from the newest.

The clock of a rank starts at the first event of any rank: how long Ray takes to place the workers is
Ray Train's business (``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S``), not a stall.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from optforge.tasks.runtime.progress import queue_sender

BEAT_EVERY_S = 5.0  # within a phase, at most one beat this often per rank (a Ray queue put, ~1 ms)
log = logging.getLogger("optforge")


class TrainingStalled(RuntimeError):
    """A training stage's ranks stopped reporting; the message says which, and where they were."""


class Heartbeat:
    """A rank's side: ``hello`` once, ``beat`` at each phase and within long ones, ``finished`` at the end.

    Sending never breaks training: an event that cannot be sent is dropped (the driver may be gone).
    """

    def __init__(self, send: Callable[[dict], None], rank: int, every_s: float = BEAT_EVERY_S):
        self.send, self.rank, self.every_s = send, rank, every_s
        self._last, self._phase = 0.0, None

    @classmethod
    def to_queue(cls, queue, rank: int, stall_timeout_s: float) -> Heartbeat:
        """A heartbeat onto the driver's Ray queue; four beats fit in a stall timeout, however short."""
        return cls(queue_sender(queue), rank, min(BEAT_EVERY_S, stall_timeout_s / 4))

    def hello(self, controller=None) -> None:
        self._phase = "starting"
        self._last = time.monotonic()
        self.send({"kind": "hello", "rank": self.rank, "epoch": -1, "phase": "starting", "controller": controller})

    def beat(self, epoch: int, phase: str) -> None:
        """Sends when the phase changed or ``every_s`` has passed since the last event."""
        now = time.monotonic()
        if phase != self._phase or now - self._last >= self.every_s:
            self._phase, self._last = phase, now
            self.send({"kind": "beat", "rank": self.rank, "epoch": epoch, "phase": phase})

    def finished(self, epoch: int) -> None:
        self.send({"kind": "finished", "rank": self.rank, "epoch": epoch, "phase": "finished"})


@dataclass
class RankState:
    seen: float  # driver's monotonic clock at the rank's last event
    epoch: int  # 0-based; -1 before the first epoch
    phase: str
    finished: bool = False


class RankWatch:
    """The driver's view of every rank's last event; ``stalled()`` says whether, and how, the stage is stuck."""

    def __init__(self, stage: str, world: int, stall_timeout_s: float, clock: Callable[[], float] = time.monotonic):
        self.stage, self.world, self.stall_timeout_s, self.clock = stage, world, stall_timeout_s, clock
        self.ranks: dict[int, RankState] = {}
        self.controller = None  # Ray Train's controller actor, from rank 0's hello
        self.first: float | None = None
        self._lock = threading.Lock()

    def observe(self, event: dict) -> None:
        with self._lock:
            now = self.clock()
            self.first = now if self.first is None else self.first
            if event["kind"] == "hello" and event.get("controller") is not None:
                self.controller = event["controller"]  # a restarted worker group has a new attempt, same controller
            self.ranks[event["rank"]] = RankState(now, event["epoch"], event["phase"], event["kind"] == "finished")

    def stalled(self) -> str | None:
        """Why the stage is stuck, or None: a rank that has not finished and has been silent too long."""
        with self._lock:
            if self.first is None:
                return None
            now = self.clock()
            silent = [r for r in range(self.world) if not self._state(r).finished
                      and now - (self._state(r).seen) > self.stall_timeout_s]
            if not silent:
                return None
            return self._message(silent, now)

    def _state(self, rank: int) -> RankState:
        return self.ranks.get(rank) or RankState(self.first, -1, "not started")

    def _message(self, silent: list[int], now: float) -> str:
        def where(s: RankState) -> str:
            return "before its first epoch" if s.epoch < 0 else f"epoch {s.epoch + 1}, {s.phase}"

        quiet = "; ".join(f"rank {r}: last report {now - self._state(r).seen:.0f} s ago, {where(self._state(r))}"
                          for r in silent)
        done = [f"rank {r} finished after epoch {s.epoch + 1}" for r, s in sorted(self.ranks.items()) if s.finished]
        last = min(self._state(r).epoch for r in range(self.world))
        return (f"{self.stage}: rank(s) {', '.join(map(str, silent))} stopped reporting (nothing for "
                f"{self.stall_timeout_s:g} s, train.stall_timeout_s) ({quiet})"
                + (f"; {', '.join(done)}" if done else "")
                + f". Last epoch reached by every rank: {last + 1 if last >= 0 else 'none'}. Ranks that stop "
                "reporting wait in a collective a peer never joined (they took different paths) or are stuck. "
                "The stage's checkpoints are kept: the next run resumes from the newest.")


class Watchdog:
    """A thread that checks ``watch`` every ``poll_s`` and, on a stall, aborts the Ray Train run (a context manager).

    ``message`` holds the reason once it fired; the driver raises ``TrainingStalled`` with it.
    """

    def __init__(self, watch: RankWatch, poll_s: float = 1.0):
        self.watch, self.poll_s = watch, poll_s
        self.message: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"optforge-watchdog-{watch.stage}", daemon=True)

    def __enter__(self) -> Watchdog:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            message = self.watch.stalled()
            if message:
                self.message = message
                log.error(message)
                _abort(self.watch.controller)
                return


def _abort(controller) -> None:
    """Ask Ray Train's controller to stop its workers and end the run (``trainer.fit()`` then raises)."""
    import ray

    if controller is None:  # rank 0 never said hello: nothing to abort through
        log.error("the Ray Train controller is unknown; the workers are left to the collective timeout")
        return
    try:
        ray.get(controller.abort.remote(), timeout=60)
    except Exception:  # the controller exits inside abort(): its reply is an actor-died error
        pass
