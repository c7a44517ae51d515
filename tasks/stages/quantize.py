"""Prefect task: ONNX Runtime dynamic INT8 quantization of the exported model."""

from __future__ import annotations

import mlflow

from optforge.tasks.runtime.caching import stage_dir, stage_task
from optforge.tasks.runtime.refs import Format, ModelRef, file_sha256
from optforge.tasks.runtime.tracking import child_run
from optforge.tasks.techniques.onnx.quantize import DynamicQuantConfig, quantize_dynamic_int8


@stage_task("quantize")
def quantize(cfg: DynamicQuantConfig, onnx_model: ModelRef, workdir: str, parent_run_id: str | None) -> ModelRef:
    """Quantize weights to INT8 (activations quantized on the fly) as variant "onnx_int8_dynamic"."""
    out = stage_dir(workdir, "quantize", {"quantize": cfg, "model": onnx_model})
    with child_run(parent_run_id, "quantize", params={"quantize": cfg.to_dict()}, tags={"optforge.source_run": onnx_model.run_id or ""}) as run:
        path = quantize_dynamic_int8(onnx_model.path, out / "model_int8.onnx", cfg)
        mlflow.log_artifact(str(path), "onnx")
    flops = {k: v for k, v in onnx_model.info.items() if k == "flops"}  # same graph, same FLOPs per sample
    return ModelRef("onnx_int8_dynamic", Format.ONNX, str(path), file_sha256(path), run.info.run_id, flops)
