"""One failing chain or engine never sinks a run: its variant comes back FAILED with its error, the rest go on.

Past the shared stages (data, teacher, export), each chain and each engine builds a variant nobody else needs,
so an exception there ends that variant only. The variant becomes a ``Format.FAILED`` ref: the benchmark
records it as a FAILED run with NaN metrics (never a champion), the parent run gets an
``optforge.failed.<variant>`` tag and the traceback as ``failures/<variant>.txt``, and the summary and the
CLI's last line count it. The failing stage's own child run already ended FAILED with its error
(``tasks/runtime/tracking.child_run``), and Prefect never caches a failed task, so the next run tries again.
``optforge run --strict`` turns any failure into a failed command, for CI.
"""

from __future__ import annotations

import hashlib
import logging
import traceback
from collections.abc import Callable

from optforge.tasks.runtime.refs import Format, ModelRef

log = logging.getLogger(__name__)
ERROR_CHARS = 300  # one line a table row and a tag can hold


def one_line(exc: BaseException) -> str:
    """``Type: first line of the message``, at most ERROR_CHARS long."""
    text = str(exc).strip().splitlines()
    line = f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
    return line if len(line) <= ERROR_CHARS else line[: ERROR_CHARS - 3] + "..."


def failed_variants(names: list[str], step: str, exc: Exception) -> list[ModelRef]:
    """One FAILED ref per variant that ``step``'s exception kept from being built, recorded on the parent run."""
    import mlflow

    error = one_line(exc)
    log.warning("%s failed at %s: %s (the other variants go on)", ", ".join(names), step, error)
    if mlflow.active_run():
        trace = "".join(traceback.format_exception(exc))
        for name in names:
            mlflow.set_tag(f"optforge.failed.{name}", f"{step}: {error}")
            mlflow.log_text(trace, f"failures/{name}.txt")
    info = {"error": error, "failed_step": step}
    digest = hashlib.sha256(f"{step}:{error}".encode()).hexdigest()
    return [ModelRef(name, Format.FAILED, "", digest, None, info) for name in names]


def contained(names: list[str], step: str, build: Callable[[], ModelRef | list[ModelRef]]) -> list[ModelRef]:
    """``build()``'s variants, or FAILED ones named ``names`` when it raises (an Exception: an interrupt
    still stops the run)."""
    try:
        built = build()
    except Exception as exc:
        return failed_variants(names, step, exc)
    return built if isinstance(built, list) else [built]
