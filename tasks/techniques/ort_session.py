"""ONNX Runtime session tuning: graph optimization level and thread counts, read back for the record.

The benchmark builds every ONNX variant's session here, so each measurement states the settings it
actually ran with (read from the session, not from the config) and can save the graph ONNX Runtime
optimized, which shows what the fusions did (e.g. QDQ pairs folded into integer kernels).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tasks.techniques.benchmark import Predictor

LEVELS = ("disable", "basic", "extended", "all")


def _level(name: str):
    import onnxruntime as ort

    levels = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    if name not in levels:
        raise ValueError(f"graph_optimization: expected one of {list(LEVELS)}, got {name!r}")
    return levels[name]


def tuned_session(onnx_path: str | Path, threads: int, graph_optimization: str = "all", inter_op_threads: int = 1,
                  optimized_model_path: str | Path | None = None):
    """A CPU session with the given level and thread counts.

    Args:
        onnx_path: the model.
        threads: intra-op threads (the parallelism inside one matmul); the same count as torch's.
        graph_optimization: "disable" | "basic" | "extended" | "all".
        inter_op_threads: threads running independent nodes at once; 1 (sequential) suits these chain graphs.
        optimized_model_path: where to save the optimized graph. With "all" it may hold CPU-specific
            layouts and contrib ops, so treat it as a record of this machine, not a portable model.
    """
    import onnxruntime as ort

    if threads < 1 or inter_op_threads < 1:
        raise ValueError(f"threads: need at least 1 intra-op and 1 inter-op thread, got {threads} and {inter_op_threads}")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = inter_op_threads
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL if inter_op_threads == 1 else ort.ExecutionMode.ORT_PARALLEL
    opts.graph_optimization_level = _level(graph_optimization)
    if optimized_model_path is not None:
        Path(optimized_model_path).parent.mkdir(parents=True, exist_ok=True)
        opts.optimized_model_filepath = str(optimized_model_path)
    return ort.InferenceSession(str(onnx_path), sess_options=opts, providers=["CPUExecutionProvider"])


def session_settings(session) -> dict[str, Any]:
    """The settings a session really runs with (what the benchmark reports next to its numbers)."""
    import onnxruntime as ort

    opts = session.get_session_options()
    level = {v: k for k, v in zip(LEVELS, map(_level, LEVELS))}.get(opts.graph_optimization_level, "unknown")
    return {
        "onnxruntime": ort.__version__,
        "providers": ",".join(session.get_providers()),
        "intra_op_threads": opts.intra_op_num_threads,
        "inter_op_threads": opts.inter_op_num_threads,
        "execution_mode": "parallel" if opts.execution_mode == ort.ExecutionMode.ORT_PARALLEL else "sequential",
        "graph_optimization": level,
    }


def session_predictor(session) -> Predictor:
    """float32 rows -> first output, the ``Predictor`` protocol the benchmark measures."""
    name = session.get_inputs()[0].name

    def predict(x: np.ndarray) -> np.ndarray:
        return session.run(None, {name: x})[0]

    return predict
