"""Cache keys for stages: (stage, stage config, input content hashes, code version, library versions,
and for the stages that measure or build for a machine, that machine).

A stage re-runs when its config, any input's content, optforge's code or a library that shapes its
output changes; otherwise Prefect returns the persisted result of the earlier run, so re-running a
completed or crashed pipeline skips what already finished. The cache may sit on a volume shared by
several nodes (infra/): a benchmark timed on one CPU, or an engine built for one GPU, is keyed by
that hardware so another node measures or builds its own. The MLflow parent run id is deliberately
not part of the key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from optforge.tasks.techniques.registry import MACHINE_BOUND_STAGES

# Parameters that identify *this* pipeline run rather than the stage's work.
NOT_IN_KEY = frozenset({"parent_run_id"})

# Libraries whose upgrade can change what a stage produces (weights, graphs, quantized models, timings).
KEYED_LIBRARIES = ("torch", "numpy", "onnx", "onnxruntime", "onnxscript", "transformers", "torch-pruning",
                   "scikit-learn", "tensorrt", "tensorrt-cu12", "apache-tvm", "apache-tvm-ffi")



@lru_cache(maxsize=1)
def code_version() -> str:
    """Hash of optforge's ``tasks`` package sources: editing a technique invalidates cached stages."""
    root = Path(__file__).resolve().parents[1]  # the whole tasks package, shells and core
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(f.relative_to(root).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


@lru_cache(maxsize=1)
def library_versions() -> dict[str, str]:
    """Installed versions of ``KEYED_LIBRARIES`` ("absent" for those not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in KEYED_LIBRARIES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "absent"
    return found


@lru_cache(maxsize=1)
def machine_identity() -> dict[str, str]:
    """The CPU model and core count, and the GPU when CUDA sees one: what a timing or an engine belongs to."""
    import os

    import torch

    from optforge.tasks.techniques.measurement.benchmark import cpu_model

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {"cpu_model": cpu_model(), "cpu_count": str(os.cpu_count()), "gpu": gpu}


def _jsonable(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if dataclasses.is_dataclass(value):
        # Refs are keyed by content, not by the run that made them.
        return {k: _jsonable(v) for k, v in dataclasses.asdict(value).items() if k != "run_id"}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    return value


def stage_key(stage: str, parameters: dict[str, Any]) -> str:
    payload = {k: _jsonable(v) for k, v in parameters.items() if k not in NOT_IN_KEY}
    key = {"stage": stage, "params": payload, "code": code_version(), "libraries": library_versions()}
    if stage in MACHINE_BOUND_STAGES:  # timings, engines built for one GPU, TVM libraries tuned on one CPU
        key["machine"] = machine_identity()
    blob = json.dumps(key, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def cache_key_fn(context, parameters: dict[str, Any]) -> str:
    """Prefect ``cache_key_fn``: the task's name plus ``stage_key``."""
    return f"optforge-{context.task.name}-{stage_key(context.task.name, parameters)}"


def stage_dir(workdir: str | Path, stage: str, parameters: dict[str, Any]) -> Path:
    """Content-addressed output folder of a stage: the same inputs always land in the same place."""
    return Path(workdir).resolve() / stage / stage_key(stage, parameters)[:16]


# Two retries, 2 s then 10 s apart: long enough for a tracking server restart or a network blip,
# short enough that a real outage still fails the run within a minute.
RETRY_DELAYS_S = [2, 10]


def stage_task(name: str, **options):
    """``@task`` with optforge's caching (key by ``cache_key_fn``, results persisted to disk) and
    retries for transient failures only (``tasks.runtime.retrying.retry_transient``)."""
    from prefect import task

    from optforge.tasks.runtime.retrying import retry_transient

    defaults = {"retries": len(RETRY_DELAYS_S), "retry_delay_seconds": RETRY_DELAYS_S, "retry_condition_fn": retry_transient}
    return task(name=name, cache_key_fn=cache_key_fn, persist_result=True, **(defaults | options))
