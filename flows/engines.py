"""Variants built from the FP32 ONNX model: its static INT8 and FP16 forms (``onnx:``), and the engines
(``engines:`` TensorRT, TVM, PyTorch GPU).

The optimize flow calls ``engine_variants`` after export and quantize; every stage goes through the
flow's StageRunner, so it is cached, tagged and timed like the others.
"""

from __future__ import annotations

import logging

from pydantic import Field

from optforge.flows.isolation import contained
from optforge.flows.onnx_config import OnnxConfig
from optforge.tasks.runtime.refs import DataRef, Format, ModelRef
from optforge.tasks.techniques.config import TechniqueConfig
from optforge.tasks.techniques.engines.tensorrt import TensorRTConfig, environment
from optforge.tasks.techniques.engines.torch_gpu import TorchGpuConfig, cuda_unavailable_reason, gpu_variants
from optforge.tasks.techniques.engines.tvm import TvmConfig

log = logging.getLogger(__name__)


class EnginesConfig(TechniqueConfig):
    """Settings of the engines: runtimes that build their own form of the model (each with ``enabled``)."""

    RENAMED = {"static_int8": "onnx.static", "fp16": "onnx.fp16"}  # ONNX transforms, not engines
    tensorrt: TensorRTConfig = Field(default_factory=TensorRTConfig, description="TensorRT FP16/INT8 engines (needs CUDA)")
    tvm: TvmConfig = Field(default_factory=TvmConfig, description="Apache TVM CPU libraries, tuned by MetaSchedule")
    torch_gpu: TorchGpuConfig = Field(default_factory=TorchGpuConfig, description="PyTorch FP16/BF16/compile on CUDA")


def engine_variants(onnx: OnnxConfig, cfg: EnginesConfig, onnx_fp32: ModelRef, baseline: ModelRef, data: DataRef,
                    workdir: str, stage) -> list[ModelRef]:
    """Run the engine stages through ``stage`` (the flow's StageRunner); return their variants.

    TensorRT variants come back as format "skipped" where CUDA or tensorrt is missing, and the TVM one
    where tvm is missing or its ONNX frontend cannot take the graph, so the summary shows why they are absent.
    A stage that raises gives its variants as FAILED (flows/isolation.py). PyTorch GPU variants need no build
    step: without CUDA they are left out and the reason is a tag on the pipeline run.
    """
    # The task shells import Prefect and MLflow; flows.params imports this module for EnginesConfig alone.
    from optforge.tasks.stages import fp16, static, tensorrt, tvm

    variants: list[ModelRef] = []
    if onnx.static.enabled:
        variants += contained([static.VARIANT], "static", lambda: stage(
            static.quantize_static, cfg=onnx.static, onnx_model=onnx_fp32, data=data, workdir=workdir))
    if onnx.fp16.enabled:
        variants += contained([fp16.VARIANT], "fp16", lambda: stage(
            fp16.convert_to_fp16, cfg=onnx.fp16, onnx_model=onnx_fp32, workdir=workdir))
    if cfg.tensorrt.enabled and cfg.tensorrt.precisions:
        variants += contained([f"trt_{p}" for p in cfg.tensorrt.precisions], "tensorrt", lambda: stage(
            tensorrt.build_engines, cfg=cfg.tensorrt, quant_cfg=onnx.static, fp16_cfg=onnx.fp16,
            onnx_model=onnx_fp32, data=data, workdir=workdir, environment=environment()))
    if cfg.tvm.enabled:
        variants += contained([tvm.VARIANT], "tvm", lambda: stage(
            tvm.compile_tvm, cfg=cfg.tvm, onnx_model=onnx_fp32, data=data, workdir=workdir))
    if cfg.torch_gpu.enabled:
        variants += torch_gpu_variants(cfg.torch_gpu, baseline)
    return variants


def torch_gpu_variants(cfg: TorchGpuConfig, baseline: ModelRef) -> list[ModelRef]:
    """References to the baseline's weights, run on CUDA by the benchmark; none (reason tagged) without CUDA."""
    reason = cuda_unavailable_reason()
    if reason:
        import mlflow

        log.info("PyTorch GPU variants skipped: %s", reason)
        if mlflow.active_run():
            mlflow.set_tag("optforge.torch_gpu.skipped", reason)
        return []
    return [
        ModelRef(v.name, Format.TORCH_CUDA, baseline.path, baseline.sha256, baseline.run_id,
                 {"dtype": v.dtype, "compiled": v.compiled, "compile_mode": cfg.compile_mode,
                  "lineage": {"parent_variant": baseline.name, "technique": v.name.removeprefix("pytorch_")}})
        for v in gpu_variants(cfg)
    ]
