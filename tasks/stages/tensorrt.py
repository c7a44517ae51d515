"""Prefect task: TensorRT engines (trt_fp16, trt_int8) with parity against ONNX Runtime, or a recorded skip.

Without CUDA or the ``tensorrt`` package the stage completes with a "skipped" variant per engine
(``tasks.stages.skipping``): it never fails the pipeline for a missing GPU.
"""

from __future__ import annotations

import re
from pathlib import Path

import mlflow
from prefect.states import Completed

from optforge.tasks.runtime.caching import stage_dir, stage_task
from optforge.tasks.runtime.refs import DataRef, Format, ModelRef, file_sha256
from optforge.tasks.runtime.tracking import child_run
from optforge.tasks.stages.skipping import skipped_variants
from optforge.tasks.techniques.data.data import load_splits
from optforge.tasks.techniques.engines.tensorrt import (
    EngineRunner,
    TensorRTConfig,
    build_engine,
    parity,
    unavailable_reason,
)
from optforge.tasks.techniques.onnx.fp16 import Fp16Config, convert_fp16
from optforge.tasks.techniques.onnx.static import StaticQuantConfig, quantize_static_int8, scaled_calibration


def _int8_for_tensorrt(cfg: StaticQuantConfig) -> StaticQuantConfig:
    """TensorRT takes only symmetric signed INT8 (zero-point 0); per-channel weights are its default."""
    return StaticQuantConfig.from_dict({**cfg.to_dict(), "activation_type": "qint8", "symmetric_activations": True,
                                        "per_channel": True})


@stage_task("tensorrt")
def build_engines(cfg: TensorRTConfig, quant_cfg: StaticQuantConfig, fp16_cfg: Fp16Config, onnx_model: ModelRef,
                  data: DataRef, workdir: str, environment: str, parent_run_id: str | None):
    """Build one engine per ``cfg.precisions``; return a Completed state whose data are the variants.

    ``environment`` (GPU, TensorRT version, or why they are missing) is part of the cache key, so a
    skip recorded on a CPU machine is not reused on a GPU one.
    """
    out = stage_dir(workdir, "tensorrt", {"tensorrt": cfg, "quant": quant_cfg, "fp16": fp16_cfg,
                                              "model": onnx_model, "data": data, "environment": environment})
    names = [f"trt_{p}" for p in cfg.precisions]
    tags = {"optforge.source_run": onnx_model.run_id or "", "optforge.environment": environment}
    with child_run(parent_run_id, "tensorrt", params={"tensorrt": cfg.to_dict()}, tags=tags) as run:
        reason = unavailable_reason()
        if reason:
            return skipped_variants(reason, names, out, onnx_model, run.info.run_id)
        splits = load_splits(data.path)
        sources = {}
        if "fp16" in cfg.precisions:
            fp16 = Fp16Config(keep_io_types=True, op_block_list=fp16_cfg.op_block_list)
            sources["fp16"] = convert_fp16(onnx_model.path, out / "model_fp16.onnx", fp16)
        if "int8" in cfg.precisions:
            int8_cfg = scaled_calibration(_int8_for_tensorrt(quant_cfg), len(splits.train))
            sources["int8"] = quantize_static_int8(onnx_model.path, out / "model_int8_qdq.onnx", splits.train,
                                                   int8_cfg, splits.val).path
        slug = re.sub(r"[^A-Za-z0-9.]+", "-", environment)[:120]
        timing = Path(workdir).resolve() / "tensorrt" / f"timing-{slug}.cache" if cfg.timing_cache else None
        refs = []
        for precision, source in sources.items():
            engine = out / f"model_{precision}.engine"
            settings = build_engine(source, engine, cfg, splits.contract, timing)
            check = parity(EngineRunner(engine), source, splits.val.head(cfg.parity_samples))
            mlflow.log_metrics({f"{precision}_parity_max_abs_diff": check["max_abs_diff"],
                                f"{precision}_parity_top1_agreement": check["top1_agreement"],
                                f"{precision}_build_seconds": settings["build_seconds"]})
            mlflow.log_dict(settings, f"build/{precision}_settings.json")
            mlflow.log_artifact(str(source), "onnx")
            mlflow.log_artifact(str(engine), "engines")
            if check["top1_agreement"] < cfg.min_top1_agreement:
                raise ValueError(f"engines.tensorrt.min_top1_agreement: the {precision} engine agrees with ONNX Runtime "
                                 f"on {check['top1_agreement']:.3f} of rows < {cfg.min_top1_agreement}")
            info = {"build": settings, "parity": check, "source_onnx": str(source),
                    "lineage": {"parent_variant": onnx_model.name, "technique": f"tensorrt_{precision}"}}
            refs.append(ModelRef(f"trt_{precision}", Format.TENSORRT, str(engine), file_sha256(engine), run.info.run_id, info))
        if timing is not None and timing.exists():
            mlflow.log_artifact(str(timing), "build")
    return Completed(message=f"built {', '.join(names)} ({environment})", data=refs)
