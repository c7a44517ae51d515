"""The Python API: ``optforge.optimize(model, data, config=...)`` runs the optimize flow from a notebook or script,
and ``optforge.tune(model, data, config=...)`` the tune flow (the search of ``optforge tune``).

It turns what a Python user holds into what the flow reads, then runs the same flow as ``optforge run``
(or ``optforge tune``):

- ``model``: a Hugging Face ``PreTrainedModel`` is saved with ``save_pretrained`` (``model.arch: huggingface``);
  any other ``nn.Module`` is saved whole with cloudpickle, so a class defined in the notebook itself reaches
  the Ray workers, and rebuilt there by ``load_pickled_module`` (a factory, ``model.arch``) with its weights
  beside it (``model.weights``); a string or path is a ``save_pretrained`` folder or an ``.onnx`` file.
- ``data``: ``(X, y)`` arrays become an ``.npz`` table; a string or path is anything ``data.source`` takes.

The files go under ``<tracking.workdir>/inputs/<content hash>/`` (for an ``nn.Module``: of its weights and its
classes' source), so the same model and data give the same stage cache keys on the next call, in this Python
session or the next. A model handed over as an object is taken as already trained
(``train.epochs: 0``, the FP32 baseline) unless the config sets ``train.epochs``.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import numpy as np

PICKLED_MODULE_FACTORY = "optforge.flows.api:load_pickled_module"


def optimize(model: Any = None, data: Any = None, config: Any = None, *, overrides: list[str] | tuple = (),
             force: bool = False, verbose: bool = False) -> dict:
    """Optimize ``model`` on ``data`` with the optimize flow; return its summary (variants, registration, report).

    Args:
        model: an ``nn.Module`` (a Hugging Face model or your own), a model folder or ``.onnx`` path, or None
            (the config's ``model`` section).
        data: ``(X, y)`` numpy arrays (a numeric table), a path ``data.source`` accepts, or None (the config's).
        config: a ``PipelineConfig``, a dict of sections (``{"train": {"epochs": 3}}``), a YAML path, or None.
        overrides: ``KEY=VALUE`` strings applied last, as with ``optforge run --set``.
        force: re-run every stage instead of reusing cached ones.
        verbose: also show library warnings and the Ray workers' own output.

    Raises:
        ConfigError: a bad config value (the message names the field).
        TypeError: ``model`` or ``data`` is of a kind optforge cannot take.
    """
    from optforge.flows.optimize import optimize as optimize_flow

    return _call(optimize_flow, model, data, config, overrides, force, verbose)


def tune(model: Any = None, data: Any = None, config: Any = None, *, overrides: list[str] | tuple = (),
         force: bool = False, verbose: bool = False) -> dict:
    """Search chains and settings for ``model`` on ``data`` with the tune flow (the config's ``tune:`` section).

    Takes what ``optimize`` takes. Returns the search's summary: every trial with its outcome and metrics,
    the Pareto front, the registration and the report. Called again with the same model, data and config,
    it resumes the search (trials already settled are not run again); ``force=True`` starts a new one.

    Raises:
        ConfigError: a bad config value (the message names the field).
        TypeError: ``model`` or ``data`` is of a kind optforge cannot take.
    """
    from optforge.flows.tune import tune as tune_flow

    return _call(tune_flow, model, data, config, overrides, force, verbose)


def _call(flow, model: Any, data: Any, config: Any, overrides, force: bool, verbose: bool) -> dict:
    """``flow`` on the config ``_config`` builds, with the CLI's quieting for this call only."""
    import warnings

    from optforge.flows.environment import embedded_defaults, quiet_libraries

    show = warnings.showwarning  # quiet_libraries' warning hook is for this call only, not the whole session
    try:
        embedded_defaults()
        quiet_libraries(verbose)
        return flow(config=_config(model, data, config, overrides), force=force)
    finally:
        warnings.showwarning = show


def _config(model: Any, data: Any, config: Any, overrides):
    """The typed config a flow runs: the caller's config and overrides, with ``model`` and ``data`` written
    as files the stages read."""
    from optforge.flows.params import apply_overrides, read_yaml, validate

    # What the caller set, without defaults: a model object is the FP32 baseline unless they set train.epochs.
    if config is None:
        raw = {}
    elif isinstance(config, (str, Path)):
        raw = read_yaml(config)
    elif isinstance(config, dict):
        raw = apply_overrides(config, [])  # a copy: the caller's dict is left as it was
    else:
        raw = config.model_dump(mode="json", exclude_unset=True)
    raw = apply_overrides(raw, list(overrides))
    inputs = Path(validate(raw).tracking.workdir).resolve() / "inputs"
    if model is not None:
        raw["model"] = _model_section(model, inputs)
        if not isinstance(model, (str, Path)) and "epochs" not in (raw.get("train") or {}):
            raw.setdefault("train", {})["epochs"] = 0
    if data is not None:
        raw.setdefault("data", {})["source"] = _data_source(data, inputs)
    return validate(raw)


def _write_bytes(path: Path, blob: bytes) -> None:
    """Atomically (a Ray worker or another call may be reading ``path``)."""
    from optforge.tasks.techniques.files import atomic_write

    atomic_write(path, lambda tmp: Path(tmp).write_bytes(blob))


def _digest(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()[:16]


def _model_section(model: Any, inputs: Path) -> dict[str, Any]:
    """The ``model`` config section for ``model``, writing it under ``inputs`` first when it is an object."""
    from torch import nn

    if isinstance(model, (str, Path)):
        path = Path(model)
        return {"arch": "onnx" if path.suffix == ".onnx" else "huggingface", "path": str(path.resolve())}
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, a model folder or an .onnx path, got {type(model).__name__}")
    import torch

    weights = io.BytesIO()
    torch.save(model.state_dict(), weights)
    if hasattr(model, "save_pretrained") and hasattr(model, "config"):  # a Hugging Face model
        folder = inputs / f"hf-{_digest(weights.getvalue() + model.config.to_json_string().encode())}"
        if not (folder / "config.json").exists():
            model.save_pretrained(str(folder))
        return {"arch": "huggingface", "path": str(folder)}
    import cloudpickle

    pickled = cloudpickle.dumps(model)
    folder = inputs / f"module-{_module_digest(model, weights.getvalue(), pickled)}"
    _write_bytes(folder / "module.pkl", pickled)  # always: this session's code is what the call runs
    if not (folder / "weights.pt").exists():
        _write_bytes(folder / "weights.pt", weights.getvalue())
    return {"arch": PICKLED_MODULE_FACTORY, "kwargs": {"file": str(folder / "module.pkl")},
            "weights": str(folder / "weights.pt")}


def _module_digest(model, weights: bytes, pickled: bytes) -> str:
    """A name for the model's folder that is the same in the next Python session: the weights and the source
    of the model's own classes (those not from torch).

    Not the pickle's hash: cloudpickle gives a class defined in ``__main__`` (a notebook's, a script's) a new
    random id in every process, so a restarted notebook would get a new folder, new stage cache keys and, for
    ``optforge.tune``, a new search instead of resuming its own. Without the source (a class typed at a
    prompt) it falls back to the pickle's hash.
    """
    import inspect

    classes = {type(m) for m in model.modules() if not type(m).__module__.startswith("torch.")}
    parts = [weights]
    try:
        for cls in sorted(classes, key=lambda c: f"{c.__module__}.{c.__qualname__}"):
            parts.append(f"{cls.__module__}.{cls.__qualname__}\n{inspect.getsource(cls)}".encode())
    except (OSError, TypeError):
        return _digest(pickled)
    return _digest(b"\0".join(parts))


def _data_source(data: Any, inputs: Path) -> str:
    """``data.source`` for ``data``: a path as given, or ``(X, y)`` arrays written as an ``.npz`` table."""
    if isinstance(data, (str, Path)):
        return str(Path(data).resolve())
    if not (isinstance(data, tuple) and len(data) == 2):
        raise TypeError(f"data: expected (X, y) arrays or a path, got {type(data).__name__}")
    x, y = (np.asarray(a) for a in data)
    blob = io.BytesIO()
    np.savez(blob, X=x, y=y)
    path = inputs / f"table-{_digest(blob.getvalue())}.npz"
    if not path.exists():
        _write_bytes(path, blob.getvalue())
    return str(path)


def load_pickled_module(file: str):
    """The factory behind an ``nn.Module`` given to ``optimize``: unpickles the module ``optimize`` wrote.

    Unpickling runs code, like importing a factory: only point ``model.kwargs.file`` at a file that
    ``optforge.optimize`` wrote from your own model.
    """
    import cloudpickle

    with open(file, "rb") as fh:
        return cloudpickle.load(fh)
