"""ONNX Runtime static INT8 in QDQ format, calibrated offline, with an accuracy-aware FP32 fallback.

Static quantization fixes every activation's scale from calibration samples, so inference runs
integer kernels end to end instead of measuring ranges per batch as dynamic INT8 does. QDQ format
(QuantizeLinear/DequantizeLinear pairs around float ops) is what both ONNX Runtime and TensorRT
consume. When the INT8 model misses the accuracy gate, the nodes whose inputs lose most to rounding
are kept in FP32, one more at a time, until the gate passes or ``max_fallback_nodes`` is hit.
The nodes are ranked by the quantization error of the tensors they read, measured in one pass of the
quantized model (``node_errors``), so finding them costs one run, not one quantization per node.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from optforge.tasks.techniques.config import TechniqueConfig
from optforge.tasks.techniques.onnx.export import load_onnx

CALIBRATION_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}
# Weight-bearing ops carry most of the quantization error (and most of the speed-up), so they are the
# fallback candidates; activations-only ops (Relu, Add, pooling) follow their neighbours.
FALLBACK_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
# Rows whose every intermediate tensor the error pass keeps in memory at once: enough for a stable
# relative error; BERT-base at 128 tokens holds about 60 MB of tensors per row.
ERROR_ROWS = 32


class StaticQuantConfig(TechniqueConfig):
    """ONNX Runtime ``quantize_static`` settings, calibration, and the accuracy budget with its fallback."""

    RENAMED = {"max_accuracy_drop": "onnx.static.accuracy_budget"}

    enabled: bool = Field(True, description="build the onnx_int8_static variant")
    calibration_samples: int = Field(256, ge=1, description="training rows fed to the calibrator (first N of the split)")
    calibration_batch_size: int = Field(4, ge=1, description="rows per calibration run; ONNX Runtime holds every "
                                        "node's output for these rows at once (BERT-base at 128 tokens: 3.2 GB at 4, 17.9 GB "
                                        "at 32, and 2.5x slower)")
    method: Literal["minmax", "entropy", "percentile"] = Field("minmax", description="how activation ranges are chosen")
    percentile: float = Field(99.999, gt=90, le=100, description="kept share of each activation's values (percentile method)")
    per_channel: bool = Field(False, description="one weight scale per output channel (more accurate, slower at batch 1 on CPU)")
    activation_type: Literal["quint8", "qint8"] = Field(
        "quint8", description="quint8 (U8S8, ORT's fast x86 path) or qint8 (what TensorRT requires)"
    )
    symmetric_activations: bool = Field(False, description="zero-point 0 for activations (TensorRT requires it)")
    preprocess: bool = Field(True, description="ORT's recommended pre-processing: shape inference + graph optimization")
    accuracy_budget: float = Field(1.0, ge=0, description="validation accuracy points INT8 may cost against FP32 before "
                                   "layers fall back to float (a budget of this step, not the registry's gate)")
    max_fallback_nodes: int = Field(3, ge=0, description="most nodes kept in FP32 to pass the gate (0: no fallback)")


@dataclass(frozen=True)
class StaticQuantResult:
    """What quantization produced and why: gate accuracies, nodes left in FP32, each fallback step."""

    path: Path
    accuracy_fp32: float | None = None
    accuracy_int8: float | None = None
    gate_passed: bool | None = None
    excluded_nodes: tuple[str, ...] = ()
    sensitivity: dict[str, float] = field(default_factory=dict)  # node -> relative error of what it reads
    steps: tuple[dict, ...] = ()
    fallback_seconds: float = 0.0  # ranking the nodes and the re-quantizations after it

    def to_dict(self) -> dict:
        return {**asdict(self), "path": str(self.path), "excluded_nodes": list(self.excluded_nodes), "steps": list(self.steps)}


def scaled_calibration(cfg: StaticQuantConfig, train_rows: int) -> StaticQuantConfig:
    """``cfg`` with ``calibration_samples`` lowered to the training split's size where the data is smaller:
    calibration ranges settle after a few hundred rows, and a small dataset must still quantize."""
    if cfg.calibration_samples <= train_rows:
        return cfg
    return cfg.model_copy(update={"calibration_samples": train_rows})


def calibration_part(data, samples: int):
    """The first ``samples`` rows of ``data`` (a ``Part``); errors name the field."""
    if len(data) == 0:
        raise ValueError("calibration_samples: the calibration data is empty")
    if samples > len(data):
        raise ValueError(f"calibration_samples: {samples} requested but the calibration data has only {len(data)} rows")
    return data.head(samples)


def _reader(part, batch: int):
    """ORT's reader protocol (``get_next`` until None) over ``part``, one batch read from disk at a time."""
    from onnxruntime.quantization import CalibrationDataReader

    class PartReader(CalibrationDataReader):
        def __init__(self, names: dict[str, type]):
            self.names = names
            self._starts = iter(range(0, len(part), batch))

        def get_next(self):
            start = next(self._starts, None)
            if start is None:
                return None
            rows = part.rows(start, start + batch)
            return {n: np.ascontiguousarray(rows[n], dtype=d) for n, d in self.names.items()}

    return PartReader


def logits(path: Path, part) -> np.ndarray:
    """Run an ONNX model over every row of ``part`` (in batches) and return its first output."""
    from optforge.tasks.techniques.measurement.metrics import predict_part
    from optforge.tasks.techniques.onnx.ort_session import onnx_predictor

    return predict_part(onnx_predictor(path), part)


def accuracy(path: Path, part) -> float:
    from optforge.tasks.techniques.measurement.metrics import top1_accuracy

    return top1_accuracy(logits(path, part), part.labels)


class _Quantizer:
    """Calibrates once (ranges cached as JSON), then re-quantizes cheaply with different node sets."""

    def __init__(self, fp32: Path, rows, cfg: StaticQuantConfig, tmp: Path):
        from optforge.tasks.techniques.onnx.ort_session import ORT_DTYPES, tuned_session

        self.fp32, self.rows, self.cfg, self.tmp = fp32, rows, cfg, tmp
        session = tuned_session(fp32)
        self.inputs = {i.name: ORT_DTYPES.get(i.type, np.float32) for i in session.get_inputs()}
        self.cache = tmp / "calibration.json"
        self.count = 0

    def __call__(self, exclude=(), only=()) -> Path:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        cfg = self.cfg
        self.count += 1
        out = self.tmp / f"int8_{self.count}.onnx"
        reader = None if self.cache.exists() else _reader(self.rows, cfg.calibration_batch_size)(self.inputs)
        quantize_static(
            str(self.fp32), str(out), reader, quant_format=QuantFormat.QDQ, per_channel=cfg.per_channel,
            activation_type=QuantType.QUInt8 if cfg.activation_type == "quint8" else QuantType.QInt8,
            weight_type=QuantType.QInt8, calibrate_method=getattr(CalibrationMethod, CALIBRATION_METHODS[cfg.method]),
            nodes_to_exclude=list(exclude), nodes_to_quantize=list(only), calibration_cache_path=str(self.cache),
            extra_options={"ActivationSymmetric": cfg.symmetric_activations, "WeightSymmetric": True,
                           "CalibPercentile": cfg.percentile},
        )
        return out


def node_errors(fp32: Path, qdq: Path, part, batch: int, tmp: Path) -> dict[str, float]:
    """Each weight-bearing node's quantization error, from one run of the quantized model: the largest
    relative error ||x - dq(q(x))|| / ||x|| among the tensors it reads (its input activations, measured
    before and after their QuantizeLinear/DequantizeLinear pair, and its weights).

    One augmented pass of the QDQ model (ORT's ``qdq_loss_debug``) replaces quantizing the model once per
    node: the cost no longer grows with the node count. Each tensor's error is local (its own rounding,
    given the quantized inputs upstream), so downstream nodes are not blamed for error made earlier.
    """
    from onnxruntime.quantization.qdq_loss_debug import (
        collect_activations,
        compute_signal_to_quantization_noice_ratio,
        create_activation_matching,
        create_weight_matching,
        modify_model_output_intermediate_tensors,
    )

    from optforge.tasks.techniques.onnx.ort_session import ORT_DTYPES, tuned_session

    augmented = tmp / "augmented.onnx"
    modify_model_output_intermediate_tensors(str(qdq), str(augmented))
    names = {i.name: ORT_DTYPES.get(i.type, np.float32) for i in tuned_session(qdq).get_inputs()}
    activations = collect_activations(str(augmented), _reader(part.head(ERROR_ROWS), batch)(names))
    augmented.unlink()
    sqnr = {name: compute_signal_to_quantization_noice_ratio(pair["pre_qdq"], pair["post_qdq"])
            for name, pair in create_activation_matching(activations).items()}
    for name, pair in create_weight_matching(str(fp32), str(qdq)).items():
        # ORT's compute_weight_error fails on a weight dequantized to a scalar (BERT has some): skip those.
        ref, deq = np.asarray(pair["float"]), np.asarray(pair["dequantized"])
        if ref.size > 1 and ref.shape == deq.shape:
            sqnr[name] = compute_signal_to_quantization_noice_ratio(ref, deq)
    relative = {name: 10 ** (-db / 20) for name, db in sqnr.items()}  # SQNR in dB -> ||noise|| / ||signal||
    return {node.name: max((relative[t] for t in node.input if t in relative), default=0.0)
            for node in load_onnx(fp32).graph.node if node.op_type in FALLBACK_OPS and node.name}


def quantize_static_int8(src: str | Path, dst: str | Path, calibration, cfg: StaticQuantConfig,
                         eval_set=None) -> StaticQuantResult:
    """Quantize ``src`` to a QDQ INT8 model at ``dst`` (written atomically).

    Args:
        src: FP32 ONNX model.
        dst: output path; appears only when complete.
        calibration: a data ``Part``; its first ``cfg.calibration_samples`` rows calibrate the ranges, read
            from disk a batch at a time.
        cfg: quantization settings and the gate.
        eval_set: a held-out ``Part`` for the accuracy gate; without it the gate and fallback are skipped.

    Returns:
        The result with gate accuracies and the nodes kept in FP32 (most sensitive first).
    """
    from optforge.tasks.techniques.onnx.quantize import preprocess

    src, dst = Path(src), Path(dst)
    load_onnx(src)  # clear error naming the file when it is missing or not ONNX
    rows = calibration_part(calibration, cfg.calibration_samples)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp:
        fp32 = src
        if cfg.preprocess:
            fp32 = Path(tmp) / "preprocessed.onnx"
            preprocess(src, fp32)
        quantize = _Quantizer(fp32, rows, cfg, Path(tmp))
        path = quantize()
        if eval_set is None:
            os.replace(path, dst)
            return StaticQuantResult(dst)
        acc_fp32, acc = accuracy(fp32, eval_set), accuracy(path, eval_set)
        passed = acc_fp32 - acc <= cfg.accuracy_budget
        steps, excluded, sensitivity, seconds = [{"excluded": [], "accuracy": acc}], [], {}, 0.0
        if not passed and cfg.max_fallback_nodes:
            start = time.perf_counter()
            sensitivity = node_errors(fp32, path, eval_set, cfg.calibration_batch_size, Path(tmp))
            for name in sorted(sensitivity, key=sensitivity.get, reverse=True)[: cfg.max_fallback_nodes]:
                excluded.append(name)
                path = quantize(exclude=excluded)
                acc = accuracy(path, eval_set)
                steps.append({"excluded": list(excluded), "accuracy": acc})
                passed = acc_fp32 - acc <= cfg.accuracy_budget
                if passed:
                    break
            seconds = time.perf_counter() - start
        os.replace(path, dst)
    return StaticQuantResult(dst, acc_fp32, acc, passed, tuple(excluded), sensitivity, tuple(steps), seconds)


def count_qdq_nodes(path: str | Path) -> int:
    """Number of QuantizeLinear/DequantizeLinear nodes: zero means nothing was quantized."""
    return sum(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in load_onnx(path).graph.node)
