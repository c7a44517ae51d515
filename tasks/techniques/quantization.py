"""ONNX Runtime dynamic INT8: weights quantized offline, activations quantized on the fly per batch.

No calibration data needed, which makes it the safe first cut; static INT8 (calibrated) comes later.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Literal

from pydantic import Field

from tasks.techniques.config import TechniqueConfig
from tasks.techniques.onnx_export import load_onnx


class DynamicQuantConfig(TechniqueConfig):
    """ONNX Runtime ``quantize_dynamic`` settings."""

    weight_type: Literal["qint8", "quint8"] = Field("qint8", description="INT8 weight type (qint8: signed, symmetric)")
    per_channel: bool = Field(False, description="one scale per output channel instead of per tensor")
    preprocess: bool = Field(True, description="run ORT's pre-processing (shape inference + graph optimization) first")


def quantize_dynamic_int8(src: str | Path, dst: str | Path, cfg: DynamicQuantConfig) -> Path:
    """Quantize ``src`` into ``dst``; ``dst`` appears only when complete (temp file + rename)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src, dst = Path(src), Path(dst)
    load_onnx(src)  # clear error naming the file when it is missing or not ONNX
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp:
        model_in = src
        if cfg.preprocess:
            model_in = Path(tmp) / "preprocessed.onnx"
            quant_pre_process(str(src), str(model_in), skip_symbolic_shape=False)
        out = Path(tmp) / "quantized.onnx"
        weight_type = QuantType.QInt8 if cfg.weight_type == "qint8" else QuantType.QUInt8
        quantize_dynamic(str(model_in), str(out), weight_type=weight_type, per_channel=cfg.per_channel)
        os.replace(out, dst)
    return dst
