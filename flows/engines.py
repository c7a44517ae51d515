"""Inference-engine variants built from the FP32 ONNX model (static INT8, FP16, TensorRT).

Owned by issue 4's work; the optimize flow calls ``engine_variants`` after export and quantize.
"""

from __future__ import annotations

from tasks.refs import DataRef, ModelRef
from tasks.techniques.config import TechniqueConfig


class EnginesConfig(TechniqueConfig):
    """Settings of the engine variants (one nested config per engine)."""


def engine_variants(cfg: EnginesConfig, onnx_fp32: ModelRef, baseline: ModelRef, data: DataRef, workdir: str,
                    stage) -> list[ModelRef]:
    """Run the engine stages through ``stage`` (the flow's StageRunner); return their variants."""
    return []
