"""Prefect task: FP16 ONNX of the exported model (variant "onnx_fp16"), for GPU runtimes."""

from __future__ import annotations

import mlflow

from optforge.tasks.runtime.caching import stage_dir, stage_task
from optforge.tasks.runtime.refs import Format, ModelRef, file_sha256
from optforge.tasks.runtime.tracking import child_run
from optforge.tasks.techniques.onnx.fp16 import Fp16Config, convert_fp16, fp16_initializer_share

VARIANT = "onnx_fp16"


@stage_task("fp16")
def convert_to_fp16(cfg: Fp16Config, onnx_model: ModelRef, workdir: str, parent_run_id: str | None) -> ModelRef:
    """Convert ``onnx_model`` to FP16 (inputs/outputs kept FP32 when ``cfg.keep_io_types``)."""
    out = stage_dir(workdir, "fp16", {"fp16": cfg, "model": onnx_model})
    tags = {"optforge.source_run": onnx_model.run_id or ""}
    with child_run(parent_run_id, "fp16", params={"fp16": cfg.to_dict()}, tags=tags) as run:
        path = convert_fp16(onnx_model.path, out / "model_fp16.onnx", cfg)
        mlflow.log_metric("fp16_initializer_share", fp16_initializer_share(path))
        mlflow.log_artifact(str(path), "onnx")
    info = {"lineage": {"parent_variant": onnx_model.name, "technique": "fp16"}}
    return ModelRef(VARIANT, Format.ONNX, str(path), file_sha256(path), run.info.run_id, info)
