"""Timing on an idle machine while other trials build: a readers-writer lock between processes.

Trials of a search build in parallel (fine-tuning, distillation, export, quantization) but are timed one
at a time: building holds the lock *shared*, timing holds it *exclusive*, so a latency is never measured
while another trial trains on the same cores. A timer that is waiting goes first: it takes a turnstile
that every builder passes through before taking its shared hold, so new builds queue behind the waiting
timer instead of starving it. Builds already running finish their current step first.

``fcntl.flock`` locks are held by the OS for the process and released when it dies, so a killed trial
never leaves the search locked. ``HOST_LOCKS`` is in this host's temp folder, so every search on the host
shares it (two searches do not time while the other builds) and nodes of a cluster do not wait on each
other: a timing is disturbed only by work on the same machine. ``optforge run``'s own stages do not take
it. POSIX only (optforge's Ray clusters are Linux).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def host_locks() -> Path:
    """The timing lock's folder: host-local (the temp folder), never a shared file system."""
    return Path(tempfile.gettempdir()) / "optforge-locks" / "timing"


@contextlib.contextmanager
def _flock(path: Path, mode: int) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, mode)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


@contextlib.contextmanager
def building(folder: str | Path) -> Iterator[None]:
    """Held while a trial builds: any number at once, none while a trial is timed."""
    folder = Path(folder)
    with _flock(folder / "turnstile.lock", fcntl.LOCK_EX):
        pass  # waits here while a timer holds the turnstile
    with _flock(folder / "machine.lock", fcntl.LOCK_SH):
        yield


@contextlib.contextmanager
def timing(folder: str | Path) -> Iterator[None]:
    """Held while a trial is timed: alone on this host's lock, after the builds in progress finish."""
    folder = Path(folder)
    with _flock(folder / "turnstile.lock", fcntl.LOCK_EX), _flock(folder / "machine.lock", fcntl.LOCK_EX):
        yield
