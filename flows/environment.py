"""The laptop defaults every optforge command puts in the environment before importing Prefect or MLflow."""

from __future__ import annotations

import os
import re
from pathlib import Path


def embedded_defaults() -> None:
    """Laptop defaults; any variable the user set wins (that is how a team points at its servers)."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # the network is closed; avoid its error
    os.environ.setdefault("DO_NOT_TRACK", "1")  # the same for Prefect's client telemetry (and its first-run notice)
    os.environ.setdefault("PREFECT_RESULTS_LOCAL_STORAGE_PATH", str(Path(".optforge/prefect-results").resolve()))
    os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    # Prefect's ephemeral API server gets 20 s to start; on a busy 2-core machine (Ray and a training run beside
    # it) it took longer and the flow failed with "Timed out while attempting to connect to ephemeral Prefect API".
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    # MLflow's HTTP client retries 7 times with doubling back-off (minutes of silence when a server is
    # down). 3 retries, 1-2-4 s apart, 10 s timeout; the stage tasks' own retries come on top.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


# Warnings a user of optforge cannot act on: the exporters' and MLflow's notes about their own internals.
QUIET_WARNING_FILES = re.compile(r"[/\\](torch|mlflow|transformers|onnxruntime|onnxscript)[/\\]|[/\\]copyreg\.py$")


def quiet_libraries(verbose: bool = False) -> None:
    """Keep the terminal to what a user can act on: progress, stage lines, skips, errors, the summary.

    Unless ``verbose``: no download/load progress bars from Hugging Face and MLflow, no library
    UserWarnings/FutureWarnings about their internals, no torch exporter notes ("torchvision is not
    installed"), no MLflow system-metrics monitor chatter, and ONNX Runtime logs errors only (its
    "Serializing optimized model with Graph Optimization level greater than ORT_ENABLE_EXTENDED" warning
    is about a record optforge keeps of the benchmarked graph on purpose). ``verbose`` also shows the Ray
    workers' own output (``OPTFORGE_VERBOSE``, read by ``ensure_ray``). Variables the user set win.
    """
    import logging
    import warnings

    if verbose:
        os.environ["OPTFORGE_VERBOSE"] = "1"
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # also transformers' "Loading weights" bar
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("TORCH_LOGS", "-onnx")  # torch sets its loggers' levels from this when it is imported
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
    # A failed stage or flow is one line on the terminal, not Prefect's traceback: the error names the field or
    # file, and the traceback is an artifact of the MLflow run (error/traceback.txt). Deployments, which do not
    # pass through here, keep Prefect's tracebacks in its UI.
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoTraceback) for f in logger.filters):
            logger.addFilter(_NoTraceback())
    # A display hook rather than a warnings filter: MLflow puts its own "once" filter in front of ours inside
    # its functions (filter_user_warnings_once), so only the hook that prints can drop those.
    warnings.showwarning = _without_library_notes(warnings.showwarning)
    import onnxruntime

    onnxruntime.set_default_logger_severity(3)  # 3 = error


class _NoTraceback:
    """A logging filter that keeps a record's message and drops its traceback."""

    def filter(self, record) -> bool:
        record.exc_info, record.exc_text = None, None
        return True


def _without_library_notes(show):
    def showwarning(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, (UserWarning, FutureWarning)) and QUIET_WARNING_FILES.search(filename or ""):
            return
        show(message, category, filename, lineno, file, line)

    showwarning.optforge_quiet = True
    return showwarning if not getattr(show, "optforge_quiet", False) else show
