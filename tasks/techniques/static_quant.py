"""ONNX Runtime static INT8 in QDQ format, calibrated offline, with an accuracy-aware FP32 fallback.

Static quantization fixes every activation's scale from calibration samples, so inference runs
integer kernels end to end instead of measuring ranges per batch as dynamic INT8 does. QDQ format
(QuantizeLinear/DequantizeLinear pairs around float ops) is what both ONNX Runtime and TensorRT
consume. When the INT8 model misses the accuracy gate, the nodes whose quantization alone moves the
logits most are kept in FP32, one at a time, until the gate passes or ``max_fallback_nodes`` is hit.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from tasks.techniques.config import TechniqueConfig
from tasks.techniques.onnx_export import load_onnx

CALIBRATION_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}
# Weight-bearing ops carry most of the quantization error (and most of the speed-up), so they are the
# fallback candidates; activations-only ops (Relu, Add, pooling) follow their neighbours.
FALLBACK_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
# Rows used to rank node sensitivity: enough for a stable relative error, cheap for large models.
SENSITIVITY_ROWS = 256


class StaticQuantConfig(TechniqueConfig):
    """ONNX Runtime ``quantize_static`` settings, calibration and the accuracy gate with its fallback."""

    enabled: bool = Field(True, description="build the onnx_int8_static variant")
    calibration_samples: int = Field(256, ge=1, description="training rows fed to the calibrator (first N of the split)")
    calibration_batch_size: int = Field(32, ge=1, description="rows per calibration batch")
    method: Literal["minmax", "entropy", "percentile"] = Field("minmax", description="how activation ranges are chosen")
    percentile: float = Field(99.999, gt=90, le=100, description="kept share of each activation's values (percentile method)")
    per_channel: bool = Field(False, description="one weight scale per output channel (more accurate, slower at batch 1 on CPU)")
    activation_type: Literal["quint8", "qint8"] = Field(
        "quint8", description="quint8 (U8S8, ORT's fast x86 path) or qint8 (what TensorRT requires)"
    )
    symmetric_activations: bool = Field(False, description="zero-point 0 for activations (TensorRT requires it)")
    preprocess: bool = Field(True, description="ORT's recommended pre-processing: shape inference + graph optimization")
    max_accuracy_drop: float = Field(1.0, ge=0, description="gate: allowed INT8 accuracy drop vs FP32 on held-out rows, points")
    max_fallback_nodes: int = Field(3, ge=0, description="most nodes kept in FP32 to pass the gate (0: no fallback)")


@dataclass(frozen=True)
class StaticQuantResult:
    """What quantization produced and why: gate accuracies, nodes left in FP32, each fallback step."""

    path: Path
    accuracy_fp32: float | None = None
    accuracy_int8: float | None = None
    gate_passed: bool | None = None
    excluded_nodes: tuple[str, ...] = ()
    sensitivity: dict[str, float] = field(default_factory=dict)
    steps: tuple[dict, ...] = ()

    def to_dict(self) -> dict:
        return {**asdict(self), "path": str(self.path), "excluded_nodes": list(self.excluded_nodes), "steps": list(self.steps)}


def calibration_rows(data: np.ndarray, samples: int) -> np.ndarray:
    """The first ``samples`` rows of ``data`` as contiguous float32; errors name the field."""
    data = np.asarray(data)
    if data.ndim != 2 or len(data) == 0:
        raise ValueError(f"calibration_samples: the calibration data is empty (shape {data.shape}); need rows of features")
    if samples > len(data):
        raise ValueError(f"calibration_samples: {samples} requested but the calibration data has only {len(data)} rows")
    return np.ascontiguousarray(data[:samples], dtype=np.float32)


def _reader(input_name: str, rows: np.ndarray, batch: int):
    from onnxruntime.quantization import CalibrationDataReader

    class ArrayReader(CalibrationDataReader):
        """Feeds ``rows`` to the calibrator in batches (ORT's reader protocol: ``get_next`` until None)."""

        def __init__(self):
            self._batches = iter([{input_name: rows[i : i + batch]} for i in range(0, len(rows), batch)])

        def get_next(self):
            return next(self._batches, None)

    return ArrayReader()


def _session(path: Path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def logits(path: Path, X: np.ndarray) -> np.ndarray:
    """Run an ONNX model on ``X`` (in chunks of 256 rows) and return its first output."""
    session = _session(path)
    name = session.get_inputs()[0].name
    X = np.ascontiguousarray(X, dtype=np.float32)
    return np.concatenate([session.run(None, {name: X[i : i + 256]})[0] for i in range(0, len(X), 256)])


def accuracy(path: Path, X: np.ndarray, y: np.ndarray) -> float:
    return 100.0 * float((logits(path, X).argmax(1) == y).mean())


class _Quantizer:
    """Calibrates once (ranges cached as JSON), then re-quantizes cheaply with different node sets."""

    def __init__(self, fp32: Path, rows: np.ndarray, cfg: StaticQuantConfig, tmp: Path):
        self.fp32, self.rows, self.cfg, self.tmp = fp32, rows, cfg, tmp
        self.input_name = load_onnx(fp32).graph.input[0].name
        self.cache = tmp / "calibration.json"
        self.count = 0

    def __call__(self, exclude=(), only=()) -> Path:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        cfg = self.cfg
        self.count += 1
        out = self.tmp / f"int8_{self.count}.onnx"
        reader = None if self.cache.exists() else _reader(self.input_name, self.rows, cfg.calibration_batch_size)
        quantize_static(
            str(self.fp32), str(out), reader, quant_format=QuantFormat.QDQ, per_channel=cfg.per_channel,
            activation_type=QuantType.QUInt8 if cfg.activation_type == "quint8" else QuantType.QInt8,
            weight_type=QuantType.QInt8, calibrate_method=getattr(CalibrationMethod, CALIBRATION_METHODS[cfg.method]),
            nodes_to_exclude=list(exclude), nodes_to_quantize=list(only), calibration_cache_path=str(self.cache),
            extra_options={"ActivationSymmetric": cfg.symmetric_activations, "WeightSymmetric": True,
                           "CalibPercentile": cfg.percentile},
        )
        return out


def node_sensitivity(fp32: Path, quantize, X: np.ndarray) -> dict[str, float]:
    """Per-node error against FP32: relative L2 error of the logits when only that node is quantized.

    Quantizing one node at a time isolates its own contribution; comparing activations of the fully
    quantized model instead would blame the last layers for error accumulated upstream.
    """
    X = X[:SENSITIVITY_ROWS]
    reference = logits(fp32, X)
    norm = float(np.linalg.norm(reference)) or 1.0
    candidates = [n.name for n in load_onnx(fp32).graph.node if n.op_type in FALLBACK_OPS and n.name]
    return {name: float(np.linalg.norm(logits(quantize(only=[name]), X) - reference)) / norm for name in candidates}


def quantize_static_int8(src: str | Path, dst: str | Path, calibration: np.ndarray, cfg: StaticQuantConfig,
                         eval_set: tuple[np.ndarray, np.ndarray] | None = None) -> StaticQuantResult:
    """Quantize ``src`` to a QDQ INT8 model at ``dst`` (written atomically).

    Args:
        src: FP32 ONNX model.
        dst: output path; appears only when complete.
        calibration: rows of features; the first ``cfg.calibration_samples`` calibrate the ranges.
        cfg: quantization settings and the gate.
        eval_set: held-out ``(X, y)`` for the accuracy gate; without it the gate and fallback are skipped.

    Returns:
        The result with gate accuracies and the nodes kept in FP32 (most sensitive first).
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src, dst = Path(src), Path(dst)
    load_onnx(src)  # clear error naming the file when it is missing or not ONNX
    rows = calibration_rows(calibration, cfg.calibration_samples)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp:
        fp32 = src
        if cfg.preprocess:
            fp32 = Path(tmp) / "preprocessed.onnx"
            quant_pre_process(str(src), str(fp32), skip_symbolic_shape=False)
        quantize = _Quantizer(fp32, rows, cfg, Path(tmp))
        path = quantize()
        if eval_set is None:
            os.replace(path, dst)
            return StaticQuantResult(dst)
        X, y = eval_set
        acc_fp32, acc = accuracy(fp32, X, y), accuracy(path, X, y)
        passed = acc_fp32 - acc <= cfg.max_accuracy_drop
        steps, excluded, sensitivity = [{"excluded": [], "accuracy": acc}], [], {}
        if not passed and cfg.max_fallback_nodes:
            sensitivity = node_sensitivity(fp32, quantize, X)
            for name in sorted(sensitivity, key=sensitivity.get, reverse=True)[: cfg.max_fallback_nodes]:
                excluded.append(name)
                path = quantize(exclude=excluded)
                acc = accuracy(path, X, y)
                steps.append({"excluded": list(excluded), "accuracy": acc})
                passed = acc_fp32 - acc <= cfg.max_accuracy_drop
                if passed:
                    break
        os.replace(path, dst)
    return StaticQuantResult(dst, acc_fp32, acc, passed, tuple(excluded), sensitivity, tuple(steps))


def count_qdq_nodes(path: str | Path) -> int:
    """Number of QuantizeLinear/DequantizeLinear nodes: zero means nothing was quantized."""
    return sum(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in load_onnx(path).graph.node)
