"""Which failures are worth retrying.

Transient: the tracking server briefly unreachable, a flaky network file system read, a timeout.
Deterministic: bad config or data, a shape mismatch, NaN loss, a missing file; retrying those only
delays the error, so they fail at once.
"""

from __future__ import annotations

# OSError subclasses that describe the request, not the weather.
_PERMANENT_OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)
# Messages of wrapped transport failures (MLflow wraps requests' errors in MlflowException).
_TRANSIENT_HINTS = ("connection refused", "max retries exceeded", "temporarily unavailable", "timed out",
                    "connection reset", "connection aborted", "503", "502", "504", "database is locked")


def is_transient(exc: BaseException | None) -> bool:
    """True for errors a retry with backoff may cure; walks the ``__cause__`` chain."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, (ValueError, TypeError, KeyError, FloatingPointError, AssertionError, *_PERMANENT_OS_ERRORS)):
            return False
        if isinstance(exc, (ConnectionError, TimeoutError)) or isinstance(exc, OSError):
            return True  # requests' ConnectionError/Timeout are OSErrors too
        if type(exc).__name__ == "MlflowException" and any(h in str(exc).lower() for h in _TRANSIENT_HINTS):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def retry_transient(task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: retry only transient failures."""
    exc = state.data if isinstance(state.data, BaseException) else state.result(raise_on_failure=False)
    return is_transient(exc if isinstance(exc, BaseException) else None)
