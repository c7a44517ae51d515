"""Measuring a variant: accuracy, batch-1 latency percentiles, batch throughput, size, params.

Every variant is wrapped as a ``Predictor`` (``{input name: array}`` -> logits) and measured by the
same code with the same thread count on rows of the same split, at the data's own shapes (an image
at its crop size, a text at its tokenized length), so the numbers compare across PyTorch and ONNX
Runtime.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn

from optforge.tasks.techniques.config import TechniqueConfig
from optforge.tasks.techniques.contract import as_tensors, forward_logits
from optforge.tasks.techniques.measurement.metrics import Predictor, part_accuracy


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

    def predict(batch) -> np.ndarray:
        with torch.inference_mode():
            return forward_logits(model, as_tensors(batch)).float().numpy()

    return predict


def timing_rows(part, count: int, offset: int = 0) -> list[dict[str, np.ndarray]]:
    """``count`` single-row batches of ``part``, taken in turn (cycled when the part is shorter)."""
    return [part.take([offset + i]) for i in range(count)]


def time_calls(predict: Predictor, batches: list, warmup: int = 0) -> np.ndarray:
    """Seconds of each call of ``predict`` on ``batches`` after ``warmup`` untimed calls: the one timing loop."""
    for k in range(warmup):
        predict(batches[k % len(batches)])
    seconds = np.empty(len(batches))
    for k, batch in enumerate(batches):
        t0 = time.perf_counter()
        predict(batch)
        seconds[k] = time.perf_counter() - t0
    return seconds


def measure(predict: Predictor, part, cfg: BenchmarkConfig) -> dict[str, float]:
    """Accuracy, batch-1 latency percentiles and batch throughput of one variant on ``part`` (a data split).

    Timing inputs are rows of ``part`` taken in turn, so every variant sees the same data. The
    throughput key stays ``throughput_sps_b64`` whatever ``cfg.batch_size`` is, so MLflow columns line
    up across runs; the batch used is logged as the ``benchmark.batch_size`` param.

    Returns:
        ``accuracy`` (percent, 0-100, on all of ``part``), ``latency_ms_p50_b1`` and ``latency_ms_p95_b1``
        (milliseconds per single-row call), ``latency_ms_mean_b1`` (their mean: the expected latency over the
        rows' mix, which is what an early-exit model costs), ``throughput_sps_b64`` (samples per second at
        ``cfg.batch_size``).

    Raises:
        ValueError: ``part`` is empty.
    """
    if len(part) == 0:
        raise ValueError("benchmark: the test split is empty")
    accuracy = part_accuracy(predict, part)
    lat_ms = time_calls(predict, timing_rows(part, cfg.iters_b1), cfg.warmup) * 1e3
    batch = part.take(np.arange(cfg.batch_size))
    elapsed_s = float(time_calls(predict, [batch] * cfg.iters_batch, cfg.warmup).sum())
    return {
        "accuracy": accuracy,
        "latency_ms_p50_b1": float(np.percentile(lat_ms, 50)),
        "latency_ms_p95_b1": float(np.percentile(lat_ms, 95)),
        "latency_ms_mean_b1": float(lat_ms.mean()),
        "throughput_sps_b64": cfg.batch_size * cfg.iters_batch / elapsed_s,
    }


def size_mb(path: str | Path) -> float:
    """File size in MB (1e6 bytes), 4 decimals: what a deployment has to ship."""
    return round(Path(path).stat().st_size / 1e6, 4)


def count_params_torch(model: nn.Module) -> int:
    """Number of parameters (elements, trainable or not) of a PyTorch model."""
    return sum(p.numel() for p in model.parameters())


def count_params_onnx(path: str | Path) -> int:
    """Elements in an ONNX model's initializers: weights plus, for quantized models, scales and zero points;
    those of control-flow branches (an early-exit model's INT8 blocks) included."""
    import onnx

    def count(graph) -> int:
        own = sum(int(np.prod(init.dims, dtype=np.int64)) for init in graph.initializer)
        return own + sum(count(a.g) for node in graph.node for a in node.attribute
                         if a.type == onnx.AttributeProto.GRAPH)

    return int(count(onnx.load(str(path)).graph))


def cpu_model() -> str:
    """The CPU's model name, logged with every benchmark because latencies only compare on one CPU.

    Linux names it in /proc/cpuinfo and macOS in sysctl; ``platform.processor()`` (Windows) is the fallback.
    """
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if platform.system() == "Darwin":
        import subprocess

        try:
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                  timeout=5, check=True).stdout.strip() or "unknown"
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or "unknown"


def int8_dot_saturates() -> bool:
    """Whether ONNX Runtime's UINT8 x INT8 kernels can saturate on this CPU, so INT8 weights need 7 bits.

    On x86-64 without VNNI, ORT multiplies with ``vpmaddubsw``, which adds two u8*s8 products into a
    saturating int16: 255 * 127 * 2 overflows it, 255 * 63 * 2 does not. VNNI (``vpdpbusd``, AVX-512 or
    AVX) and ARM's dot products accumulate in int32. ONNX Runtime's docs give the same rule for
    ``reduce_range``. Reads Linux's /proc/cpuinfo; elsewhere an x86-64 CPU is assumed to lack VNNI (safe side).
    """
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return not {"avx512_vnni", "avx_vnni", "amx_int8"} & set(flags)
