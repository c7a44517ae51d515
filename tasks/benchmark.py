"""Prefect task: measure every variant the same way, one MLflow child run per variant.

Each variant's run carries the same metric names (``accuracy``, ``latency_ms_p50_b1``, ...), so the
MLflow UI compares variants column by column.
"""

from __future__ import annotations

from pathlib import Path

import mlflow

from tasks.caching import stage_task
from tasks.refs import DataRef, ModelRef, VariantResult
from tasks.techniques.benchmark import (
    BenchmarkConfig,
    count_params_onnx,
    count_params_torch,
    cpu_model,
    measure,
    ort_predictor,
    size_mb,
    torch_predictor,
)
from tasks.techniques.data import load_splits
from tasks.techniques.models import load_model
from tasks.tracking import child_run


def _torch(ref: ModelRef, cfg: BenchmarkConfig):
    model, _ = load_model(ref.path)
    return torch_predictor(model, cfg.threads), size_mb(Path(ref.path) / "model.pt"), count_params_torch(model)


def _onnx(ref: ModelRef, cfg: BenchmarkConfig):
    return ort_predictor(ref.path, cfg), size_mb(ref.path), count_params_onnx(ref.path)


# Explicit dispatch on the artifact format.
LOADERS = {"torch": _torch, "onnx": _onnx}


@stage_task("benchmark")
def benchmark(cfg: BenchmarkConfig, variants: list[ModelRef], data: DataRef, parent_run_id: str | None) -> list[VariantResult]:
    """Accuracy on the test split, size, params, batch-1 latency and batch throughput per variant."""
    splits = load_splits(data.path)
    results = []
    for ref in variants:
        tags = {"optforge.variant": ref.name, "optforge.format": ref.format, "optforge.source_run": ref.run_id or "",
                **{f"optforge.{k}": str(v) for k, v in ref.info.get("lineage", {}).items()}}
        params = {"benchmark": cfg.to_dict(), "cpu_model": cpu_model()}
        with child_run(parent_run_id, "benchmark", run_name=ref.name, params=params, tags=tags) as run:
            predict, size, n_params = LOADERS[ref.format](ref, cfg)
            metrics = measure(predict, splits.X_test, splits.y_test, cfg) | {"size_mb": size, "params": float(n_params)}
            if "flops" in ref.info:  # forward FLOPs per sample, counted on the PyTorch model the variant came from
                metrics["flops"] = float(ref.info["flops"])
            mlflow.log_metrics(metrics)
        results.append(VariantResult(ref.name, metrics, run.info.run_id))
    return results
