"""The one place an ONNX Runtime session is built: graph optimization level and thread counts, read back.

Export parity, calibration, the quantization gate, the benchmark and the harness all build their
sessions here, so each measurement states the settings it actually ran with (read from the session,
not from the config) and can save the graph ONNX Runtime optimized, which shows what the fusions did
(e.g. QDQ pairs folded into integer kernels).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from optforge.tasks.techniques.measurement.metrics import Predictor

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


def tuned_session(onnx_path: str | Path, threads: int = 1, graph_optimization: str = "all", inter_op_threads: int = 1,
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


ORT_DTYPES = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(int32)": np.int32,
              "tensor(float16)": np.float16}


def session_predictor(session) -> Predictor:
    """``{input name: array}`` -> first output: the ``Predictor`` every runtime is measured as.

    Arrays are cast to the dtypes the session declares (an FP16 model with FP32 inputs, int64 token
    ids), and inputs the session does not take are left out.
    """
    wanted = {i.name: ORT_DTYPES.get(i.type, np.float32) for i in session.get_inputs()}

    def predict(batch) -> np.ndarray:
        feed = {name: np.ascontiguousarray(batch[name], dtype=dtype) for name, dtype in wanted.items()}
        return session.run(None, feed)[0]

    return predict


def onnx_predictor(onnx_path: str | Path, threads: int = 1, graph_optimization: str = "all") -> Predictor:
    """A ``Predictor`` over a fresh session of ``onnx_path``."""
    if not Path(onnx_path).is_file():
        raise FileNotFoundError(f"ONNX file not found: {onnx_path}")
    return session_predictor(tuned_session(onnx_path, threads, graph_optimization))
