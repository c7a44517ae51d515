"""Prefect task: the FP32 ONNX model compiled by Apache TVM (variant tvm_llvm), with parity against ONNX
Runtime, or a recorded skip.

Skipped (``tasks.stages.skipping``) where the ``tvm`` package is missing or its Relax ONNX frontend cannot
take the graph; a compiled engine whose logits differ from ONNX Runtime's by more than
``engines.tvm.parity_atol`` fails the stage. The libraries are built (and tuned) for this host's CPU,
so the stage is machine-bound in the cache key and the variant is never registered (not portable).
"""

from __future__ import annotations

import mlflow
from prefect.states import Completed

from optforge.tasks.runtime.caching import stage_dir, stage_task
from optforge.tasks.runtime.refs import DataRef, Format, ModelRef, file_sha256
from optforge.tasks.runtime.tracking import child_run
from optforge.tasks.stages.skipping import skipped_variants
from optforge.tasks.techniques.data.data import load_splits
from optforge.tasks.techniques.engines.tensorrt import parity
from optforge.tasks.techniques.engines.tvm import (
    MANIFEST,
    FrontendError,
    TvmConfig,
    TvmRunner,
    compile_onnx,
    library_mb,
    unavailable_reason,
)

VARIANT = "tvm_llvm"


@stage_task("tvm")
def compile_tvm(cfg: TvmConfig, onnx_model: ModelRef, data: DataRef, workdir: str, parent_run_id: str | None):
    """Compile (and, with ``cfg.trials``, tune) ``onnx_model``; a Completed state whose data is the variant."""
    out = stage_dir(workdir, "tvm", {"tvm": cfg, "model": onnx_model, "data": data})
    tags = {"optforge.source_run": onnx_model.run_id or ""}
    with child_run(parent_run_id, "tvm", params={"tvm": cfg.to_dict()}, tags=tags) as run:
        reason = unavailable_reason()
        splits = load_splits(data.path)
        if reason is None:
            try:
                build = compile_onnx(onnx_model.path, out, splits.contract, cfg)
            except FrontendError as exc:
                reason = str(exc)
        if reason:
            return skipped_variants(reason, [VARIANT], out, onnx_model, run.info.run_id, single=True)
        check = parity(TvmRunner(out, cfg.threads), onnx_model.path, splits.val.head(cfg.parity_samples))
        mlflow.log_metrics({"compile_s": build.compile_s, "tune_s": build.tune_s, "trials": cfg.trials,
                            "parity_max_abs_diff": check["max_abs_diff"],
                            "parity_top1_agreement": check["top1_agreement"], "library_mb": library_mb(out)})
        mlflow.set_tags({"optforge.tvm.target": str(build.target), "optforge.tvm.version": build.tvm_version})
        mlflow.log_artifact(str(out / MANIFEST), "tvm")
        for name in build.libraries.values():
            mlflow.log_artifact(str(out / name), "tvm")
        if check["max_abs_diff"] > cfg.parity_atol:
            raise ValueError(f"engines.tvm.parity_atol: TVM's logits differ from ONNX Runtime's by "
                             f"{check['max_abs_diff']:.3g} > {cfg.parity_atol}")
        settings = {"target": build.target, "trials": cfg.trials, "search": cfg.search, "compile_s": build.compile_s,
                    "tune_s": build.tune_s, "batch_sizes": list(build.libraries), "tvm": build.tvm_version}
        info = {"build": settings, "parity": check, "source_onnx": onnx_model.path,
                "lineage": {"parent_variant": onnx_model.name, "technique": "tvm"}}
        ref = ModelRef(VARIANT, Format.TVM, str(out), file_sha256(out), run.info.run_id, info)
    trials = f"{cfg.trials} trials" if cfg.trials else "untuned"
    return Completed(message=f"compiled {VARIANT} ({trials}, {build.compile_s:.1f} s + {build.tune_s:.1f} s tuning)",
                     data=ref)
