"""Prefect task: ONNX Runtime transformer fusion of a PyTorch model, as variant "onnx_fused" (or a chain step)."""

from __future__ import annotations

import mlflow

from optforge.tasks.runtime.caching import stage_dir, stage_task
from optforge.tasks.runtime.refs import DataRef, Format, ModelRef, file_sha256
from optforge.tasks.runtime.tracking import child_run
from optforge.tasks.techniques.data.data import load_splits
from optforge.tasks.techniques.models.rebuild import load_model
from optforge.tasks.techniques.onnx.export import max_abs_diff
from optforge.tasks.techniques.onnx.fuse import FuseConfig, attention_shape, export_for_fusion, fuse

PARITY_ROWS = 64  # held-out rows the fused graph is compared on


@stage_task("fuse")
def fuse_onnx(cfg: FuseConfig, model: ModelRef, data: DataRef, workdir: str, parent_run_id: str | None,
              run_name: str = "fuse") -> ModelRef:
    """Export ``model`` for ORT's transformer optimizer, fuse it, check parity; log the fused operator counts."""
    out = stage_dir(workdir, "fuse", {"fuse": cfg, "model": model, "data": data})
    tags = {"optforge.source_run": model.run_id or ""}
    with child_run(parent_run_id, "fuse", run_name=run_name, params={"fuse": cfg.to_dict()}, tags=tags) as run:
        torch_model, spec = load_model(model.path)
        splits = load_splits(data.path)
        raw = export_for_fusion(torch_model, splits.contract, out / "unfused.onnx", cfg.opset)
        counts = fuse(raw, out / "model.onnx", spec.hf_config, *attention_shape(torch_model))
        raw.unlink()
        path = out / "model.onnx"
        diff = max_abs_diff(torch_model, path, splits.test.rows(0, PARITY_ROWS))
        mlflow.log_metrics({f"fused_{k}" if not k.startswith("nodes") else k: v for k, v in counts.items()}
                           | {"parity_max_abs_diff": diff})
        if not diff <= cfg.parity_atol:  # NaN fails too
            raise ValueError(f"onnx.fuse.parity_atol: the fused graph's logits differ from PyTorch's by {diff:.3g} > "
                             f"{cfg.parity_atol}")
        mlflow.log_artifact(str(path), "onnx")
    info = {k: v for k, v in model.info.items() if k == "flops"} | {"parity_max_abs_diff": diff, "fused": counts}
    return ModelRef("onnx_fused", Format.ONNX, str(path), file_sha256(path), run.info.run_id, info)
