"""Prefect task: measure every variant the same way, one MLflow child run per variant.

Each variant's run carries the same metric names (``accuracy``, ``latency_ms_p50_b1``, ...), so the
MLflow UI compares variants column by column. ONNX variants also record the ONNX Runtime session
settings they ran with and the graph ONNX Runtime optimized. A variant that could not be built here
(format "skipped", e.g. TensorRT without a GPU) gets a run with its reason and NaN timings, so it
shows in the summary table without ever passing the registration gate.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import torch

from optforge.tasks.runtime.caching import stage_task
from optforge.tasks.runtime.refs import DataRef, Format, ModelRef, VariantResult
from optforge.tasks.runtime.tracking import child_run
from optforge.tasks.techniques.compression.packing import PACKED_FILE
from optforge.tasks.techniques.data.data import load_splits
from optforge.tasks.techniques.measurement.benchmark import (
    BenchmarkConfig,
    count_params_onnx,
    count_params_torch,
    cpu_model,
    measure,
    size_mb,
    torch_predictor,
)
from optforge.tasks.techniques.measurement.metrics import Predictor
from optforge.tasks.techniques.models.rebuild import load_model
from optforge.tasks.techniques.onnx.ort_session import session_predictor, session_settings, tuned_session

SKIPPED = Format.SKIPPED  # a variant that could not be built on this machine (see tasks/stages/tensorrt.py)
FAILED = Format.FAILED  # a variant whose chain raised (see flows/isolation.py)
TIMED = ("accuracy", "latency_ms_p50_b1", "latency_ms_p95_b1", "latency_ms_mean_b1", "throughput_sps_b64", "size_mb")


@dataclass
class Loaded:
    """A variant ready to time: its predictor, size, params, runtime settings and files worth keeping."""

    predict: Predictor
    size_mb: float
    params: int
    settings: dict = field(default_factory=dict)
    artifacts: list[Path] = field(default_factory=list)


def _torch(ref: ModelRef, cfg: BenchmarkConfig, scratch: Path) -> Loaded:
    model, _ = load_model(ref.path)
    settings = {"torch": torch.__version__, "intra_op_threads": cfg.threads}
    return Loaded(torch_predictor(model, cfg.threads), size_mb(_stored_form(Path(ref.path))), count_params_torch(model),
                  settings)


def _stored_form(folder: Path) -> Path:
    """What a PyTorch variant costs to store: its bit-packed form when it has one (weight clustering), else
    its state_dict. It still runs as float, so only the size differs."""
    packed = folder / PACKED_FILE
    return packed if packed.is_file() else folder / "model.pt"


def _onnx(ref: ModelRef, cfg: BenchmarkConfig, scratch: Path) -> Loaded:
    """ONNX Runtime CPU session; its real settings, and the graph it optimized (a record of this CPU:
    at level "all" it may use CPU-specific layouts, so it is not a portable model)."""
    optimized = scratch / f"{ref.name}_ort_{cfg.graph_optimization}.onnx"
    session = tuned_session(ref.path, cfg.threads, cfg.graph_optimization, optimized_model_path=optimized)
    artifacts = [optimized] if optimized.exists() else []
    return Loaded(session_predictor(session), size_mb(ref.path), count_params_onnx(ref.path), session_settings(session), artifacts)


def _tensorrt(ref: ModelRef, cfg: BenchmarkConfig, scratch: Path) -> Loaded:
    from optforge.tasks.techniques.engines.tensorrt import EngineRunner

    settings = {k: str(v) for k, v in ref.info.get("build", {}).items()}
    return Loaded(EngineRunner(ref.path), size_mb(ref.path), count_params_onnx(ref.info["source_onnx"]), settings)


def _tvm(ref: ModelRef, cfg: BenchmarkConfig, scratch: Path) -> Loaded:
    """TVM libraries run by the Relax VM with the benchmark's thread count; size: the libraries, weights inside."""
    from optforge.tasks.techniques.engines.tvm import TvmRunner, library_mb

    settings = {k: str(v) for k, v in ref.info.get("build", {}).items()} | {"threads": cfg.threads}
    return Loaded(TvmRunner(ref.path, cfg.threads), library_mb(ref.path), count_params_onnx(ref.info["source_onnx"]),
                  settings)


def _torch_cuda(ref: ModelRef, cfg: BenchmarkConfig, scratch: Path) -> Loaded:
    from optforge.tasks.techniques.engines.torch_gpu import device_predictor

    model, _ = load_model(ref.path)
    info = ref.info
    predict = device_predictor(model, "cuda", info["dtype"], info["compiled"], info.get("compile_mode", "default"))
    settings = {"torch": torch.__version__, "device": torch.cuda.get_device_name(), "dtype": info["dtype"],
                "compiled": info["compiled"]}
    return Loaded(predict, size_mb(Path(ref.path) / "model.pt"), count_params_torch(model), settings)


# Explicit dispatch on the artifact format.
LOADERS = {Format.TORCH: _torch, Format.ONNX: _onnx, Format.TENSORRT: _tensorrt, Format.TVM: _tvm,
           Format.TORCH_CUDA: _torch_cuda}


def load_variant(ref: ModelRef, cfg: BenchmarkConfig, scratch: Path) -> Loaded:
    """The variant's ``Loaded`` by its format; ``scratch`` receives files the caller may keep."""
    if ref.format not in LOADERS:
        raise ValueError(f"variant {ref.name}: no benchmark loader for format '{ref.format}' "
                         f"(known: {sorted(map(str, LOADERS))})")
    return LOADERS[ref.format](ref, cfg, scratch)


def _skipped(ref: ModelRef) -> dict[str, float]:
    """NaN timings (never better than anything, and MLflow shows "not measured") and the params of the
    network it would have run, under the same metric names as every other variant."""
    mlflow.set_tag("optforge.skipped", ref.info.get("skip_reason", "unknown"))
    source = ref.info.get("source_onnx")
    params = float(count_params_onnx(source)) if source and Path(source).exists() else math.nan
    return {name: math.nan for name in TIMED} | {"params": params}


@stage_task("benchmark")
def benchmark(cfg: BenchmarkConfig, variants: list[ModelRef], data: DataRef, parent_run_id: str | None) -> list[VariantResult]:
    """Accuracy on the test split, size, params, batch-1 latency and batch throughput per variant."""
    splits = load_splits(data.path)
    results = []
    for ref in variants:
        tags = {"optforge.variant": ref.name, "optforge.format": str(ref.format), "optforge.source_run": ref.run_id or "",
                **{f"optforge.{k}": str(v) for k, v in ref.info.get("lineage", {}).items()}}
        params = {"benchmark": cfg.to_dict(), "cpu_model": cpu_model()}
        with child_run(parent_run_id, "benchmark", run_name=ref.name, params=params, tags=tags) as run:
            if ref.format == FAILED:  # a step of its chain raised (flows/isolation.py): nothing to measure
                mlflow.set_tags({"optforge.failed": f"{ref.info['failed_step']}: {ref.info['error']}",
                                 "optforge.error": ref.info["error"]})
                metrics = {name: math.nan for name in TIMED} | {"params": math.nan}
            elif ref.format == SKIPPED:
                metrics = _skipped(ref)
                mlflow.log_metrics(metrics)
            else:
                with tempfile.TemporaryDirectory() as scratch:
                    loaded = load_variant(ref, cfg, Path(scratch))
                    mlflow.log_params({f"runtime.{k}": v for k, v in loaded.settings.items()})
                    for path in loaded.artifacts:
                        mlflow.log_artifact(str(path), "runtime")
                metrics = measure(loaded.predict, splits.test, cfg)
                metrics |= {"size_mb": loaded.size_mb, "params": float(loaded.params)}
                if "flops" in ref.info:  # forward FLOPs per sample, counted on the PyTorch model the variant came from
                    metrics["flops"] = float(ref.info["flops"])
                mlflow.log_metrics(metrics)
        if ref.format == FAILED:  # the variant's run says FAILED in the MLflow UI, like the step that failed
            mlflow.MlflowClient().set_terminated(run.info.run_id, "FAILED")
        results.append(VariantResult(ref.name, metrics, run.info.run_id))
    return results
