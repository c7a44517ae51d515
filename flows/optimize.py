"""The optimize flow: prepare data -> plan -> train -> the ONNX forms (export, dynamic and static INT8, fusion,
FP16) -> engines -> compression chains -> benchmark -> register -> report.

Wiring only. The flow's MLflow run is the parent; each stage logs a nested child run. Stages are
cached on (config, input content, code version), so a re-run after a completed or crashed run
skips the stages that finished; ``force`` re-runs them all.
"""

# No ``from __future__ import annotations`` here: Prefect validates the flow's parameters with a pydantic
# model built from the signature, and a served or deployed flow is loaded from this file under another
# module name, where string annotations ("PipelineConfig | None") cannot be resolved.
import contextlib
import json
import time
import traceback
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import mlflow
import yaml
from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from optforge.flows.chains import chain_variants
from optforge.flows.defaults import apply_folder_defaults, settle, summary_line, text_limits
from optforge.flows.engines import engine_variants
from optforge.flows.isolation import contained
from optforge.flows.params import PipelineConfig, load_config, peek_tracking
from optforge.flows.plan import Plan, plan
from optforge.flows.preflight import check_environment
from optforge.tasks.runtime.refs import DataRef, Format, ModelRef, file_sha256
from optforge.tasks.runtime.tracking import close_dead_runs, configure, error_tags, flatten, process_tags
from optforge.tasks.stages.benchmark import benchmark
from optforge.tasks.stages.data import prepare_data
from optforge.tasks.stages.export import export, import_onnx
from optforge.tasks.stages.fuse import fuse_onnx
from optforge.tasks.stages.init_from import resolve_init
from optforge.tasks.stages.quantize import quantize
from optforge.tasks.stages.register import hash_config, register
from optforge.tasks.stages.report import report
from optforge.tasks.stages.train import train


class StageRunner:
    """Calls stage tasks, records on the parent run which ran and which came from the cache."""

    def __init__(self, force: bool, parent_run_id: str):
        self.force, self.parent_run_id = force, parent_run_id
        self.stages: list[dict[str, Any]] = []

    def __call__(self, stage_task, **kwargs):
        logger = get_run_logger()
        start = time.perf_counter()
        state = stage_task.with_options(refresh_cache=self.force)(**kwargs, parent_run_id=self.parent_run_id, return_state=True)
        result = state.result()
        cached = state.name == "Cached"
        if cached and not _outputs_exist(result):
            # The cache record outlived the files it points to (workdir deleted): recompute.
            state = stage_task.with_options(refresh_cache=True)(**kwargs, parent_run_id=self.parent_run_id, return_state=True)
            result, cached = state.result(), False
        seconds = time.perf_counter() - start
        name = stage_task.name
        run_ids = [r.run_id for r in (result if isinstance(result, list) else [result]) if getattr(r, "run_id", None)]
        mlflow.set_tags({f"optforge.stage.{name}.cached": str(cached).lower(),
                         f"optforge.stage.{name}.run_id": ",".join(run_ids)})
        mlflow.log_metric(f"stage_seconds_{name}", seconds)
        self.stages.append({"stage": name, "cached": cached, "seconds": round(seconds, 2), "run_ids": run_ids})
        logger.info("stage %-13s %s in %.1f s", name, "cached" if cached else "done", seconds)
        return result


def _outputs_exist(result) -> bool:
    items = result if isinstance(result, list) else [result]
    return all(Path(r.path).exists() for r in items if hasattr(r, "path"))


def _tag_prefect_run(parent_run_id: str) -> None:
    """Put the MLflow run id on the Prefect flow run (the reverse link is an MLflow tag)."""
    from prefect.client.orchestration import get_client

    run_id = flow_run.get_id()
    if not run_id:
        return
    with get_client(sync_client=True) as client:
        current = client.read_flow_run(run_id)
        client.update_flow_run(run_id, tags=sorted(set(current.tags) | {f"mlflow_run_id:{parent_run_id}"}))


@flow(name="optimize")
def optimize(config: PipelineConfig | None = None, config_path: str | None = None, overrides: list[str] | None = None,
             force: bool = False) -> dict:
    """Run the whole pipeline once; return a summary (variants, metrics, registration, stage timings).

    Args:
        config: the pipeline config, typed: the Prefect UI shows each section's fields with their defaults
            and descriptions, and a deployment's server rejects a bad value before it creates a run.
        config_path: a YAML config instead (the CLI's ``--config``); not both.
        overrides: ``KEY=VALUE`` strings applied on top of either (the CLI's ``--set``).
        force: re-run every stage instead of reusing cached ones.
    """
    with pipeline_run("optimize", config_path, overrides, config) as parent_run_id:
        summary = _pipeline(load_config(config_path, overrides, config), force, parent_run_id)
        mlflow.log_text(json.dumps(summary, indent=2), "summary.json")
    return summary


@contextlib.contextmanager
def pipeline_run(pipeline: str, config_path: str | None, overrides: list[str] | None,
                 config: PipelineConfig | None) -> Iterator[str]:
    """The flow's MLflow parent run (``optforge.pipeline`` = ``pipeline``), yielding its id.

    Closes the runs that killed processes left RUNNING first; an error ends the run FAILED with the error
    as a tag and goes on up.
    """
    logger = get_run_logger()
    check_environment(prefect=False)  # deployment runs do not pass through the CLI's check
    experiment_id = configure(peek_tracking(config_path, overrides, config).experiment)
    given = config_path or ("<typed config>" if config is not None else "<defaults>")
    tags = {"optforge.pipeline": pipeline, "prefect.flow_run_id": str(flow_run.get_id() or ""),
            "optforge.config_path": str(given), **process_tags()}
    with mlflow.start_run(run_name=f"{pipeline}-{flow_run.get_name() or 'local'}", tags=tags) as parent:
        closed = close_dead_runs(experiment_id, parent.info.run_id)
        if closed:
            mlflow.set_tag("optforge.closed_dead_runs", ",".join(closed))
            logger.warning("marked %d run(s) of killed processes KILLED: %s", len(closed), ", ".join(closed))
        try:
            yield parent.info.run_id
        except BaseException as exc:
            mlflow.set_tags(error_tags(exc))
            with contextlib.suppress(Exception):  # the traceback a user reads instead of the console's
                mlflow.log_text("".join(traceback.format_exception(exc)), "error/traceback.txt")
            logger.error("%s failed: %s", pipeline, exc)
            raise


def _sha(path: str | None) -> str | None:
    """Content hash of a user's file or folder (part of a stage's cache key), None when absent."""
    return file_sha256(path) if path and Path(path).exists() else None


def prepare(cfg: PipelineConfig, workdir: str, stage: StageRunner) -> tuple[DataRef, Plan]:
    """The data stage, then the plan: which steps apply to this model and data, logged before anything trains."""
    logger = get_run_logger()
    cfg, derived = apply_folder_defaults(cfg)  # a model folder's own processor and config, where the config is silent
    tokenizer = cfg.data.tokenizer or (cfg.model.path if cfg.model.arch == "huggingface" else None)
    text = {"tokenizer": tokenizer, "tokenizer_sha256": _sha(tokenizer), **text_limits(cfg)} if cfg.data.text_column else {}
    data = stage(prepare_data, cfg=cfg.data, source_sha256=_sha(None if cfg.data.source == "digits" else cfg.data.source),
                 new_source_sha256=_sha(cfg.data.new_source), workdir=workdir, **text)
    mlflow.set_tag("optforge.data_fingerprint", data.sha256)
    cfg, kind, more = settle(cfg, data.inputs)  # the token length, the family's chains, fine-tuning defaults
    derived += more
    mlflow.set_tag("optforge.model_family", kind)
    logger.info("model family: %s", kind)
    if derived:
        mlflow.log_params({f"derived.{d.field}": d.value for d in derived})
        mlflow.set_tag("optforge.derived", summary_line(derived)[:5000])
        logger.info(summary_line(derived))
    run_plan = plan(cfg, data.inputs, data.name)
    for step, reason in run_plan.skipped.items():
        logger.warning("skipped %s: %s", step, reason)
    if run_plan.skipped:
        mlflow.set_tags({f"optforge.skipped.{k}": v[:5000] for k, v in run_plan.skipped.items()})
    mlflow.set_tag("optforge.registry_name", run_plan.cfg.register.model_name)
    return data, run_plan


def train_teacher(cfg: PipelineConfig, workdir: str, stage: StageRunner, data: DataRef) -> ModelRef:
    """The FP32 baseline: trained (or taken as given) by the train stage."""
    init = resolve_init(cfg.train.init_from, workdir) if cfg.train.init_from else None
    model_sha = _sha(cfg.model.path) or _sha(cfg.model.weights)
    return stage(train, cfg=cfg.train, model_cfg=cfg.model, data=data, workdir=workdir, init=init,
                 model_sha256=model_sha)


def build_variants(cfg: PipelineConfig, workdir: str, stage: StageRunner) -> tuple[DataRef, list[ModelRef], Plan]:
    """Every variant-producing stage, in order: data, the plan, the FP32 baseline, its ONNX forms, engines, chains.

    Shared by ``optimize`` and ``optforge bench``; same configs give the same cache entries.
    """
    data, run_plan = prepare(cfg, workdir, stage)
    cfg = run_plan.cfg
    if cfg.model.arch == "onnx":
        onnx_fp32 = stage(import_onnx, model_path=cfg.model.path, model_sha256=_sha(cfg.model.path), data=data,
                          workdir=workdir)
        onnx_int8 = stage(quantize, cfg=cfg.onnx.quantize, onnx_model=onnx_fp32, workdir=workdir)
        engines = cfg.engines.model_copy(update={"torch_gpu": cfg.engines.torch_gpu.model_copy(update={"enabled": False})})
        variants = [onnx_fp32, onnx_int8, *engine_variants(cfg.onnx, engines, onnx_fp32, None, data, workdir, stage)]
        return data, variants, run_plan
    model = train_teacher(cfg, workdir, stage, data)
    onnx_fp32 = stage(export, cfg=cfg.onnx.export, model=model, data=data, workdir=workdir)
    # Past the shared stages, a variant that raises ends FAILED alone (flows/isolation.py).
    variants = [model, onnx_fp32, *contained(["onnx_int8_dynamic"], "quantize", lambda: stage(
        quantize, cfg=cfg.onnx.quantize, onnx_model=onnx_fp32, workdir=workdir))]
    if cfg.onnx.fuse.enabled:  # the plan turned it off, with the reason, for models ORT's optimizer does not know
        variants += contained(["onnx_fused", "onnx_fused_int8_dynamic"], "fuse",
                              lambda: _fused(cfg, model, data, workdir, stage))
    variants += engine_variants(cfg.onnx, cfg.engines, onnx_fp32, model, data, workdir, stage)
    variants += chain_variants(cfg, model, data, workdir, stage)
    return data, variants, run_plan


def _fused(cfg: PipelineConfig, model: ModelRef, data: DataRef, workdir: str, stage: StageRunner) -> list[ModelRef]:
    """ONNX Runtime's transformer fusion of the teacher, and its dynamic INT8."""
    onnx_fused = stage(fuse_onnx, cfg=cfg.onnx.fuse, model=model, data=data, workdir=workdir)
    fused_int8 = stage(quantize.with_options(name="quantize_fused"), cfg=cfg.onnx.quantize, onnx_model=onnx_fused,
                       workdir=workdir)
    return [replace(onnx_fused, info={**onnx_fused.info, "lineage": {"parent_variant": model.name, "technique": "fuse"}}),
            replace(fused_int8, name="onnx_fused_int8_dynamic",
                    info={**onnx_fused.info, **fused_int8.info, "lineage": {"parent_variant": onnx_fused.name,
                                                                            "technique": "quantize"}})]


def _pipeline(cfg: PipelineConfig, force: bool, parent_run_id: str) -> dict:
    _tag_prefect_run(parent_run_id)
    mlflow.log_params(flatten(cfg.to_dict()))
    config_hash = hash_config(cfg.to_dict())
    mlflow.set_tag("optforge.config_hash", config_hash)
    mlflow.log_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), "config.yaml")
    workdir = str(Path(cfg.tracking.workdir).resolve())
    stage = StageRunner(force, parent_run_id)

    data, variants, run_plan = build_variants(cfg, workdir, stage)
    cfg = run_plan.cfg
    results = stage(benchmark, cfg=cfg.benchmark, variants=variants, data=data)
    registration = stage(register, cfg=cfg.register, results=results, variants=variants, data=data,
                         config_hash=config_hash)

    base = next(r.metrics for r in results if r.name == cfg.register.baseline)
    skipped = {v.name: v.info["skip_reason"] for v in variants if v.format == Format.SKIPPED}
    failed = {v.name: f"{v.info['failed_step']}: {v.info['error']}" for v in variants if v.format == Format.FAILED}
    table = [
        {"variant": r.name, **r.metrics, "speedup_b1": base["latency_ms_p50_b1"] / r.metrics["latency_ms_p50_b1"],
         **({"skipped": skipped[r.name]} if r.name in skipped else {}),
         **({"failed": failed[r.name]} if r.name in failed else {})}
        for r in results
    ]
    mlflow.set_tag("optforge.failed_variants", str(len(failed)))
    mlflow.set_tags({"optforge.registered": registration.variant or "none", "optforge.register_reason": registration.reason})
    # Not cached on purpose: every run gets its own report, built from what MLflow recorded.
    report_ref = report(cfg=cfg.register, results=results, variants=variants, registration=registration,
                        workdir=workdir, parent_run_id=parent_run_id)
    return {
        "parent_run_id": parent_run_id, "experiment": cfg.tracking.experiment, "data_fingerprint": data.sha256,
        "variants": table, "stages": stage.stages, "skipped": run_plan.skipped, "failed": failed,
        "registration": {"variant": registration.variant, "model_name": registration.model_name,
                         "version": registration.version, "reason": registration.reason,
                         "alias": getattr(registration, "alias", None)},
        "report": report_ref.html,
    }
