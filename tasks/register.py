"""Prefect task: log the selected variant as an MLflow model and register it."""

from __future__ import annotations

import mlflow
import numpy as np
from mlflow.models import infer_signature

from tasks.caching import stage_task
from tasks.refs import DataRef, ModelRef, Registration, VariantResult
from tasks.techniques.benchmark import BenchmarkConfig, ort_predictor, torch_predictor
from tasks.techniques.data import load_splits
from tasks.techniques.models import load_model
from tasks.techniques.selection import RegisterConfig, select_variant
from tasks.tracking import child_run


def _log_torch(ref: ModelRef, example: np.ndarray, registered_name: str | None):
    model, _ = load_model(ref.path)
    signature = infer_signature(example, torch_predictor(model, 1)(example))
    return mlflow.pytorch.log_model(model, name="model", signature=signature, input_example=example,
                                    registered_model_name=registered_name)


def _log_onnx(ref: ModelRef, example: np.ndarray, registered_name: str | None):
    import onnx

    signature = infer_signature(example, ort_predictor(ref.path, BenchmarkConfig())(example))
    return mlflow.onnx.log_model(onnx.load(ref.path), name="model", signature=signature, input_example=example,
                                 registered_model_name=registered_name)


LOGGERS = {"torch": _log_torch, "onnx": _log_onnx}


@stage_task("register")
def register(cfg: RegisterConfig, results: list[VariantResult], variants: list[ModelRef], data: DataRef,
             parent_run_id: str | None) -> Registration:
    """Register the fastest variant within the accuracy gate, or record why none qualifies."""
    with child_run(parent_run_id, "register", params={"register": cfg.to_dict()}) as run:
        selection = select_variant({r.name: r.metrics for r in results}, cfg)
        mlflow.set_tags({"optforge.selection": selection.reason, "optforge.passing": ",".join(selection.passing)})
        if selection.chosen is None or not cfg.enabled:
            reason = selection.reason if selection.chosen is None else f"register.enabled is false ({selection.reason})"
            return Registration(None, None, None, reason, run.info.run_id)
        ref = next(v for v in variants if v.name == selection.chosen)
        chosen = next(r for r in results if r.name == selection.chosen)
        example = load_splits(data.path).X_test[:4]
        info = LOGGERS[ref.format](ref, example, cfg.model_name)
        mlflow.log_metrics(chosen.metrics)
        version = str(info.registered_model_version)
        client = mlflow.MlflowClient()
        for key, value in {"variant": ref.name, "data_fingerprint": data.sha256, "benchmark_run": chosen.run_id,
                           **{k: f"{v:.6g}" for k, v in chosen.metrics.items()}}.items():
            client.set_model_version_tag(cfg.model_name, version, key, value)
        mlflow.set_tags({"optforge.registered_model": cfg.model_name, "optforge.registered_version": version})
    return Registration(ref.name, cfg.model_name, version, selection.reason, run.info.run_id)
