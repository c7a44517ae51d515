"""Memory of a process tree from /proc, for the bench scripts: anonymous memory (``RssAnon``; memory-mapped
file pages the kernel can drop are not counted) plus what the Ray object store holds in ``/dev/shm``."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path


def anon_mb(pid: str | int = "self") -> float:
    """``RssAnon`` of a process in MB (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def tree_pids(root: int) -> list[int]:
    """``root`` and its descendants, from /proc (Ray's raylet and workers are children of the driver)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


class TreeSampler(threading.Thread):
    """Peak of (anonymous memory of the process tree + /dev/shm in use), in MB, sampled until ``stop``."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self._stop_event = 0.0, threading.Event()
        self.base = self.sample()

    @staticmethod
    def sample() -> float:
        shm = shutil.disk_usage("/dev/shm").used / 2**20 if os.path.isdir("/dev/shm") else 0.0
        return sum(anon_mb(p) for p in tree_pids(os.getpid())) + shm

    def run(self):
        while not self._stop_event.wait(0.2):
            self.peak = max(self.peak, self.sample())

    def stop(self) -> float:
        self._stop_event.set()
        self.join()
        return self.peak
