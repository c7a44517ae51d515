"""The ``onnx:`` section: the ONNX transforms of the FP32 model (export, fusion, dynamic and static INT8, FP16).

One section for what turns a model into another ONNX model, apart from ``engines:`` (runtimes that compile
their own form: TensorRT, TVM, PyTorch on a GPU). The same settings apply to the baseline's ONNX variants
and to the chains' ONNX steps. Config only: loading it imports neither Prefect nor MLflow.
"""

from __future__ import annotations

from pydantic import Field

from optforge.tasks.techniques.config import TechniqueConfig
from optforge.tasks.techniques.onnx.export import ExportConfig
from optforge.tasks.techniques.onnx.fp16 import Fp16Config
from optforge.tasks.techniques.onnx.fuse import FuseConfig
from optforge.tasks.techniques.onnx.quantize import DynamicQuantConfig
from optforge.tasks.techniques.onnx.static import StaticQuantConfig


class OnnxConfig(TechniqueConfig):
    """Settings of each ONNX transform (the steps export, fuse, quantize, static; and FP16)."""

    export: ExportConfig = Field(default_factory=ExportConfig, description="ONNX export and parity check (onnx_fp32)")
    fuse: FuseConfig = Field(default_factory=FuseConfig, description="ONNX Runtime transformer fusion (onnx_fused)")
    quantize: DynamicQuantConfig = Field(default_factory=DynamicQuantConfig, description="dynamic INT8 "
                                         "(onnx_int8_dynamic)")
    static: StaticQuantConfig = Field(default_factory=StaticQuantConfig, description="static INT8, QDQ, calibrated "
                                      "(onnx_int8_static)")
    fp16: Fp16Config = Field(default_factory=Fp16Config, description="FP16 ONNX for GPU runtimes (onnx_fp16)")
