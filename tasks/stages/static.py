"""Prefect task: ONNX Runtime static INT8 (QDQ) of the exported model, calibrated on training rows.

The accuracy gate runs on the validation split (the test split stays untouched for the benchmark);
nodes kept in FP32 by the fallback are logged as a tag, a param and ``fallback.json``.
"""

from __future__ import annotations

import mlflow

from optforge.tasks.runtime.caching import stage_dir, stage_task
from optforge.tasks.runtime.refs import DataRef, Format, ModelRef, file_sha256
from optforge.tasks.runtime.tracking import child_run
from optforge.tasks.techniques.data.data import load_splits
from optforge.tasks.techniques.onnx.static import (
    StaticQuantConfig,
    count_qdq_nodes,
    quantize_static_int8,
    scaled_calibration,
)

VARIANT = "onnx_int8_static"


@stage_task("static")
def quantize_static(cfg: StaticQuantConfig, onnx_model: ModelRef, data: DataRef, workdir: str,
                    parent_run_id: str | None) -> ModelRef:
    """Calibrate and quantize ``onnx_model`` as variant "onnx_int8_static"; fall back to FP32 nodes if needed."""
    out = stage_dir(workdir, "static", {"static": cfg, "model": onnx_model, "data": data})
    tags = {"optforge.source_run": onnx_model.run_id or ""}
    with child_run(parent_run_id, "static", params={"static": cfg.to_dict()}, tags=tags) as run:
        splits = load_splits(data.path)
        used = scaled_calibration(cfg, len(splits.train))
        if used is not cfg:  # the default asks for more rows than a small dataset has: use them all, and say so
            mlflow.set_tag("optforge.scaled.calibration_samples",
                           f"{cfg.calibration_samples} -> {used.calibration_samples} (the training split's rows)")
            mlflow.log_param("calibration_samples_used", used.calibration_samples)
        result = quantize_static_int8(onnx_model.path, out / "model_int8_static.onnx", splits.train, used,
                                      eval_set=splits.val)
        excluded = ",".join(result.excluded_nodes) or "none"
        mlflow.set_tags({"optforge.excluded_nodes": excluded, "optforge.gate_passed": str(result.gate_passed).lower()})
        mlflow.log_metrics({"val_accuracy_fp32": result.accuracy_fp32, "val_accuracy_int8": result.accuracy_int8,
                            "val_accuracy_drop": result.accuracy_fp32 - result.accuracy_int8,
                            "excluded_nodes": float(len(result.excluded_nodes)),
                            "fallback_seconds": result.fallback_seconds,
                            "qdq_nodes": float(count_qdq_nodes(result.path))})
        mlflow.log_dict(result.to_dict(), "fallback.json")
        mlflow.log_artifact(str(result.path), "onnx")
    info = {"excluded_nodes": list(result.excluded_nodes), "gate_passed": result.gate_passed,
            "lineage": {"parent_variant": onnx_model.name, "technique": "static"}}
    return ModelRef(VARIANT, Format.ONNX, str(result.path), file_sha256(result.path), run.info.run_id, info)
