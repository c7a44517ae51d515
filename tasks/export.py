"""Prefect task: ONNX export with a dynamic batch axis, checker and a parity check against PyTorch."""

from __future__ import annotations

import mlflow

from tasks.caching import stage_dir, stage_task
from tasks.refs import DataRef, ModelRef, file_sha256
from tasks.techniques.data import load_splits
from tasks.techniques.models import load_model
from tasks.techniques.onnx_export import ExportConfig, export_onnx, max_abs_diff
from tasks.tracking import child_run


@stage_task("export_onnx")
def export(cfg: ExportConfig, model: ModelRef, data: DataRef, workdir: str, parent_run_id: str | None) -> ModelRef:
    """Export ``model`` to ONNX as variant "onnx_fp32"; fail when parity exceeds ``cfg.parity_atol``."""
    out = stage_dir(workdir, "export_onnx", {"export": cfg, "model": model})
    with child_run(parent_run_id, "export_onnx", params={"export": cfg.to_dict()}, tags={"optforge.source_run": model.run_id or ""}) as run:
        torch_model, _ = load_model(model.path)
        path = export_onnx(torch_model, data.num_features, out / "model.onnx", cfg)
        held_out = load_splits(data.path).X_test[: cfg.parity_samples]
        diff = max_abs_diff(torch_model, path, held_out)
        mlflow.log_metric("parity_max_abs_diff", diff)
        if diff > cfg.parity_atol:
            raise ValueError(f"export.parity_atol: ONNX Runtime and PyTorch logits differ by {diff:.3g} > {cfg.parity_atol}")
        mlflow.log_artifact(str(path), "onnx")
    return ModelRef("onnx_fp32", "onnx", str(path), file_sha256(path), run.info.run_id,
                    {**{k: v for k, v in model.info.items() if k == "flops"}, "parity_max_abs_diff": diff})
