"""Measuring a variant: accuracy, batch-1 latency percentiles, batch throughput, size, params.

Every variant is wrapped as a ``Predictor`` (float32 rows -> logits) and measured by the same code
with the same thread count, so the numbers compare across PyTorch and ONNX Runtime.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn

from tasks.techniques.config import TechniqueConfig

Predictor = Callable[[np.ndarray], np.ndarray]


class BenchmarkConfig(TechniqueConfig):
    """How variants are timed. The same settings apply to every variant of a run."""

    threads: int = Field(1, ge=1, description="intra-op threads for torch and ONNX Runtime alike")
    warmup: int = Field(20, ge=0, description="untimed calls before timing")
    iters_b1: int = Field(200, ge=1, description="timed batch-1 calls (latency percentiles)")
    batch_size: int = Field(64, ge=1, description="batch for throughput; reported as throughput_sps_b64 regardless")
    iters_batch: int = Field(30, ge=1, description="timed calls at batch_size")
    graph_optimization: Literal["disable", "basic", "extended", "all"] = Field(
        "all", description="ONNX Runtime graph optimization level"
    )


def torch_predictor(model: nn.Module, threads: int) -> Predictor:
    torch.set_num_threads(threads)
    model = model.eval()

    def predict(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(x)).numpy()

    return predict


def ort_session(onnx_path: str | Path, cfg: BenchmarkConfig):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = cfg.threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[cfg.graph_optimization]
    return ort.InferenceSession(str(onnx_path), sess_options=opts, providers=["CPUExecutionProvider"])


def ort_predictor(onnx_path: str | Path, cfg: BenchmarkConfig) -> Predictor:
    session = ort_session(onnx_path, cfg)
    name = session.get_inputs()[0].name

    def predict(x: np.ndarray) -> np.ndarray:
        return session.run(None, {name: x})[0]

    return predict


def measure(predict: Predictor, X: np.ndarray, y: np.ndarray, cfg: BenchmarkConfig) -> dict[str, float]:
    """Accuracy (%) on all of (X, y); latency p50/p95 at batch 1 (ms); throughput at ``batch_size``."""
    X = np.ascontiguousarray(X, dtype=np.float32)
    preds = np.concatenate([predict(X[i : i + 256]).argmax(1) for i in range(0, len(X), 256)])
    accuracy = 100.0 * float((preds == y).mean())

    rows = [X[i % len(X) : i % len(X) + 1] for i in range(cfg.warmup + cfg.iters_b1)]
    for r in rows[: cfg.warmup]:
        predict(r)
    times = []
    for r in rows[cfg.warmup :]:
        t0 = time.perf_counter()
        predict(r)
        times.append(time.perf_counter() - t0)
    lat = np.asarray(times) * 1e3

    reps = -(-cfg.batch_size // len(X))
    batch = np.ascontiguousarray(np.tile(X, (reps, 1))[: cfg.batch_size])
    for _ in range(max(1, cfg.warmup // 10)):
        predict(batch)
    t0 = time.perf_counter()
    for _ in range(cfg.iters_batch):
        predict(batch)
    elapsed = time.perf_counter() - t0
    return {
        "accuracy": accuracy,
        "latency_ms_p50_b1": float(np.percentile(lat, 50)),
        "latency_ms_p95_b1": float(np.percentile(lat, 95)),
        "throughput_sps_b64": cfg.batch_size * cfg.iters_batch / elapsed,
    }


def size_mb(path: str | Path) -> float:
    return round(Path(path).stat().st_size / 1e6, 4)


def count_params_torch(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_params_onnx(path: str | Path) -> int:
    import onnx

    return int(sum(np.prod(init.dims, dtype=np.int64) for init in onnx.load(str(path)).graph.initializer))


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
