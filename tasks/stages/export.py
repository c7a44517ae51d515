"""Prefect tasks: ONNX export with the contract's inputs and a parity check against PyTorch; or an ONNX
file the user brings, checked against the data's contract."""

from __future__ import annotations

import shutil

import mlflow
import numpy as np

from optforge.tasks.runtime.caching import stage_dir, stage_task
from optforge.tasks.runtime.refs import DataRef, Format, ModelRef, file_sha256
from optforge.tasks.runtime.tracking import child_run
from optforge.tasks.techniques.data.data import load_splits
from optforge.tasks.techniques.models.rebuild import load_model
from optforge.tasks.techniques.onnx.export import ExportConfig, export_onnx, load_onnx, max_abs_diff
from optforge.tasks.techniques.onnx.ort_session import onnx_predictor, tuned_session


@stage_task("export")
def export(cfg: ExportConfig, model: ModelRef, data: DataRef, workdir: str, parent_run_id: str | None) -> ModelRef:
    """Export ``model`` to ONNX as variant "onnx_fp32"; fail when parity exceeds ``cfg.parity_atol``."""
    out = stage_dir(workdir, "export", {"export": cfg, "model": model, "data": data})
    with child_run(parent_run_id, "export", params={"export": cfg.to_dict()}, tags={"optforge.source_run": model.run_id or ""}) as run:
        torch_model, _ = load_model(model.path)
        splits = load_splits(data.path)
        held_out = splits.test.rows(0, cfg.parity_samples)  # real rows: traced with, then compared on
        path = export_onnx(torch_model, splits.contract, out / "model.onnx", cfg, example=held_out)
        diff = max_abs_diff(torch_model, path, held_out)
        mlflow.log_metric("parity_max_abs_diff", diff)
        if not diff <= cfg.parity_atol:  # NaN fails too
            raise ValueError(f"onnx.export.parity_atol: ONNX Runtime and PyTorch logits differ by {diff:.3g} > {cfg.parity_atol}")
        mlflow.log_artifact(str(path), "onnx")
    return ModelRef("onnx_fp32", Format.ONNX, str(path), file_sha256(path), run.info.run_id,
                    {**{k: v for k, v in model.info.items() if k == "flops"}, "parity_max_abs_diff": diff})


def check_onnx_inputs(path, contract) -> None:
    """The file's graph inputs must be the contract's names; the error lists both."""
    proto = load_onnx(path)  # read once: a user's model can be large
    initializers = {i.name for i in proto.graph.initializer}
    graph = [i.name for i in proto.graph.input if i.name not in initializers]
    if sorted(graph) != sorted(contract.names):
        raise ValueError(f"model.path: {path} takes inputs {graph} but the data's inputs are {list(contract.names)}; "
                         "export the model with input names matching the data")


@stage_task("import_onnx")
def import_onnx(model_path: str, model_sha256: str, data: DataRef, workdir: str, parent_run_id: str | None) -> ModelRef:
    """``model.arch: onnx``: the user's ONNX file becomes variant "onnx_fp32" once it takes the data's inputs
    and gives (N, num_classes) finite logits on real rows (there is no PyTorch model to compare with)."""
    out = stage_dir(workdir, "import_onnx", {"model": model_sha256, "data": data})
    with child_run(parent_run_id, "import_onnx", params={"model.path": model_path}) as run:
        splits = load_splits(data.path)
        check_onnx_inputs(model_path, splits.contract)
        rows = splits.val.rows(0, 8)
        logits = onnx_predictor(model_path)(rows)
        if logits.ndim != 2 or logits.shape[1] != splits.num_classes or not np.isfinite(logits).all():
            raise ValueError(f"model.path: {model_path} returns {logits.shape} logits (finite: "
                             f"{bool(np.isfinite(logits).all())}) for 8 rows; expected (8, {splits.num_classes}) finite")
        out.mkdir(parents=True, exist_ok=True)
        path = out / "model.onnx"
        shutil.copyfile(model_path, path)
        tuned_session(path)  # ORT can build a session (custom ops, opset) before anything else relies on it
        mlflow.log_artifact(str(path), "onnx")
        mlflow.set_tag("optforge.note", "model.arch=onnx: training, export and the PyTorch-only stages are skipped")
    return ModelRef("onnx_fp32", Format.ONNX, str(path), file_sha256(path), run.info.run_id, {})
