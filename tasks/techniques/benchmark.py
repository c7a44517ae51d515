"""Measuring a variant: accuracy, batch-1 latency percentiles, batch throughput, size, params.

Every variant is wrapped as a ``Predictor`` (float32 rows -> logits) and measured by the same code
with the same thread count, so the numbers compare across PyTorch and ONNX Runtime.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn

from tasks.techniques.config import TechniqueConfig

# float32 (N, F) -> logits (N, C), as numpy arrays.
Predictor = Callable[[np.ndarray], np.ndarray]

# Rows per call when computing accuracy: bounds memory on large test sets, not a timed quantity.
_ACCURACY_BATCH = 256


class BenchmarkConfig(TechniqueConfig):
    """How variants are timed. The same settings apply to every variant of a run."""

    threads: int = Field(1, ge=1, description="intra-op threads for torch and ONNX Runtime alike")
    warmup: int = Field(20, ge=0, description="untimed calls before each timed loop")
    iters_b1: int = Field(200, ge=1, description="timed batch-1 calls (latency percentiles)")
    batch_size: int = Field(64, ge=1, description="batch for throughput; reported as throughput_sps_b64 regardless")
    iters_batch: int = Field(30, ge=1, description="timed calls at batch_size")
    graph_optimization: Literal["disable", "basic", "extended", "all"] = Field(
        "all", description="ONNX Runtime graph optimization level"
    )


def torch_predictor(model: nn.Module, threads: int) -> Predictor:
    """Wrap a PyTorch model (eval mode, ``inference_mode``) as a ``Predictor``.

    ``torch.set_num_threads`` is process-wide: it is set here so PyTorch and ONNX Runtime variants are
    timed with the same number of intra-op threads.
    """
    torch.set_num_threads(threads)
    model = model.eval()

    def predict(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy()

    return predict


def ort_session(onnx_path: str | Path, cfg: BenchmarkConfig):
    """An ONNX Runtime CPU session with pinned threads (intra-op ``cfg.threads``, inter-op 1)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = cfg.threads
    opts.inter_op_num_threads = 1  # our models are single chains: parallel branches would only add noise
    opts.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[cfg.graph_optimization]
    return ort.InferenceSession(str(onnx_path), sess_options=opts, providers=["CPUExecutionProvider"])


def ort_predictor(onnx_path: str | Path, cfg: BenchmarkConfig) -> Predictor:
    """Wrap an ONNX model (one input, logits as first output) as a ``Predictor``."""
    if not Path(onnx_path).is_file():
        raise FileNotFoundError(f"ONNX file not found: {onnx_path}")
    session = ort_session(onnx_path, cfg)
    name = session.get_inputs()[0].name

    def predict(x: np.ndarray) -> np.ndarray:
        return session.run(None, {name: np.ascontiguousarray(x, dtype=np.float32)})[0]

    return predict


def measure(predict: Predictor, X: np.ndarray, y: np.ndarray, cfg: BenchmarkConfig) -> dict[str, float]:
    """Accuracy, batch-1 latency percentiles and batch throughput of one variant.

    Timing inputs are rows of ``X`` taken in turn (cycled when ``X`` is shorter than needed), so every
    variant sees the same data. The throughput key stays ``throughput_sps_b64`` whatever
    ``cfg.batch_size`` is, so MLflow columns line up across runs; the batch used is logged as the
    ``benchmark.batch_size`` param.

    Returns:
        ``accuracy`` (percent, 0-100, on all of X, y), ``latency_ms_p50_b1`` and ``latency_ms_p95_b1``
        (milliseconds per single-row call), ``throughput_sps_b64`` (samples per second at
        ``cfg.batch_size``).

    Raises:
        ValueError: X is not a non-empty (N, F) array or y does not have N labels.
    """
    X = np.ascontiguousarray(X, dtype=np.float32)
    y = np.asarray(y).reshape(-1)
    if X.ndim != 2 or len(X) == 0:
        raise ValueError(f"X: expected a non-empty (N, F) array, got shape {X.shape}")
    if len(y) != len(X):
        raise ValueError(f"y: expected {len(X)} labels (one per row of X), got {len(y)}")

    preds = np.concatenate([predict(X[i : i + _ACCURACY_BATCH]).argmax(1) for i in range(0, len(X), _ACCURACY_BATCH)])
    accuracy = 100.0 * float((preds == y).mean())

    rows = [X[i % len(X)][None, :] for i in range(cfg.warmup + cfg.iters_b1)]
    for row in rows[: cfg.warmup]:
        predict(row)
    lat_ms = np.empty(cfg.iters_b1)
    for k, row in enumerate(rows[cfg.warmup :]):
        t0 = time.perf_counter()
        predict(row)
        lat_ms[k] = (time.perf_counter() - t0) * 1e3

    batch = np.ascontiguousarray(np.take(X, np.arange(cfg.batch_size) % len(X), axis=0))
    for _ in range(cfg.warmup):
        predict(batch)
    t0 = time.perf_counter()
    for _ in range(cfg.iters_batch):
        predict(batch)
    elapsed_s = time.perf_counter() - t0
    return {
        "accuracy": accuracy,
        "latency_ms_p50_b1": float(np.percentile(lat_ms, 50)),
        "latency_ms_p95_b1": float(np.percentile(lat_ms, 95)),
        "throughput_sps_b64": cfg.batch_size * cfg.iters_batch / elapsed_s,
    }


def size_mb(path: str | Path) -> float:
    """File size in MB (1e6 bytes), 4 decimals: what a deployment has to ship."""
    return round(Path(path).stat().st_size / 1e6, 4)


def count_params_torch(model: nn.Module) -> int:
    """Number of parameters (elements, trainable or not) of a PyTorch model."""
    return sum(p.numel() for p in model.parameters())


def count_params_onnx(path: str | Path) -> int:
    """Elements in an ONNX model's initializers: weights plus, for quantized models, scales and zero points."""
    import onnx

    model = onnx.load(str(path))
    return int(sum(int(np.prod(init.dims, dtype=np.int64)) for init in model.graph.initializer))


def cpu_model() -> str:
    """The CPU's model name, logged with every benchmark because latencies only compare on one CPU."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
