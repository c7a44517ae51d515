"""Writing files so that a reader, a crash or a concurrent run never sees half of one."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | Path, write: Callable[[str], object], suffix: str = "") -> Path:
    """Call ``write(tmp)`` on a temp file beside ``path``, then rename it into place.

    The rename is atomic because both names are in the same folder. ``suffix`` is for writers that
    insist on an extension (``np.savez`` appends ".npz" to a name without it).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
