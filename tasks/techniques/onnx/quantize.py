"""ONNX Runtime dynamic INT8: weights quantized offline, activations quantized on the fly per batch.

No calibration data needed, which makes it the safe first cut; static INT8 (calibrated) comes later.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Literal

import onnx
from pydantic import Field

from optforge.tasks.techniques.config import TechniqueConfig
from optforge.tasks.techniques.onnx.export import load_onnx


class DynamicQuantConfig(TechniqueConfig):
    """ONNX Runtime ``quantize_dynamic`` settings."""

    weight_type: Literal["qint8", "quint8"] = Field("qint8", description="INT8 weight type (qint8: signed, symmetric)")
    per_channel: bool = Field(False, description="one scale per output channel instead of one per tensor")
    preprocess: bool = Field(True, description="run ORT's pre-processing (symbolic shape inference + optimization)")


def preprocess(src: str | Path, dst: str | Path) -> bool:
    """ORT's ``quant_pre_process`` of ``src`` into ``dst``; returns whether symbolic shape inference ran.

    Its symbolic shape inference does not finish on some dynamo exports with a dynamic sequence axis
    (the BERT export: "Incomplete symbolic shape inference"); ONNX's own shape inference and the graph
    optimization still run then, which is what the quantizers need. It also fails inside control-flow
    subgraphs (an early-exit model's ``If`` branches), so a graph with ``If`` or ``Loop`` nodes skips it.
    """
    import time

    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if {n.op_type for n in onnx.load(str(src), load_external_data=False).graph.node} & {"If", "Loop"}:
        quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
        return False
    started = time.time()
    try:
        quant_pre_process(str(src), str(dst), skip_symbolic_shape=False)
        return True
    except Exception as exc:
        if "symbolic shape" not in str(exc).lower():
            raise
        _remove_shape_inference_debris(started)
        quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
        return False


SHAPE_DEBRIS = "sym_shape_infer_temp.onnx"


def _remove_shape_inference_debris(since: float) -> None:
    """When ORT's symbolic shape inference gives up it saves its partial model as ``sym_shape_infer_temp.onnx``
    in the process's working directory, with the weights in UUID-named external-data files beside it
    (440 MB for BERT-base). Remove what this call wrote there (files older than ``since`` are not ours)."""
    debris = Path(SHAPE_DEBRIS)
    if not debris.is_file() or debris.stat().st_mtime < since:
        return
    model = onnx.load(str(debris), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location" and Path(entry.value).name == entry.value:  # a bare name in the cwd
                Path(entry.value).unlink(missing_ok=True)
    debris.unlink(missing_ok=True)


def quantize_dynamic_int8(src: str | Path, dst: str | Path, cfg: DynamicQuantConfig) -> Path:
    """Quantize the ONNX model ``src`` to dynamic INT8 in ``dst``.

    MatMul/Gemm weights become INT8 initializers and the graph gains ``DynamicQuantizeLinear`` +
    ``MatMulInteger`` nodes. ORT recommends its pre-processing (``quant_pre_process``: symbolic shape
    inference, then ORT's basic graph optimizations) so the quantizer sees complete shapes and fused ops.
    Models from ``export_onnx`` quantize with or without it (stale weight ``value_info`` is stripped
    there), which is why it is a switch and not a requirement.

    ``dst`` is written atomically: everything goes to a temp folder beside it and is renamed into place
    only when complete, so a crash never leaves a half-written model.

    Args:
        src: fp32 ONNX model.
        dst: destination .onnx file; parent folders are created.
        cfg: quantization settings.

    Returns:
        ``dst`` as a ``Path``.

    Raises:
        FileNotFoundError: ``src`` does not exist.
        ValueError: ``src`` is not an ONNX model, or quantization fails (names ``src``).
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst = Path(src), Path(dst)
    load_onnx(src)  # clear error naming the file when it is missing or not ONNX
    dst.parent.mkdir(parents=True, exist_ok=True)
    weight_type = QuantType.QInt8 if cfg.weight_type == "qint8" else QuantType.QUInt8
    with tempfile.TemporaryDirectory(dir=dst.parent, prefix=".quantize-") as tmp:
        model_in = src
        try:
            if cfg.preprocess:
                model_in = Path(tmp) / "preprocessed.onnx"
                preprocess(src, model_in)
            out = Path(tmp) / "quantized.onnx"
            # ONNX shape inference gives no types for ORT's fused contrib operators (Attention, SkipLayerNorm,
            # from fuse.py): DefaultTensorType tells the quantizer that an untyped tensor is float.
            # EnableSubgraph quantizes inside If branches (an early-exit model's blocks), whose weights are
            # outer-scope initializers; without it they stayed float (25.5 of the teacher's 26 MB).
            quantize_dynamic(str(model_in), str(out), weight_type=weight_type, per_channel=cfg.per_channel,
                             extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT, "EnableSubgraph": True})
        except Exception as exc:
            raise ValueError(f"dynamic INT8 quantization of {src} failed: {type(exc).__name__}: {exc}") from exc
        os.replace(out, dst)  # same folder, so the rename is atomic
    return dst
