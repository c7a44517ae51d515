"""Prefect task ``report``: the run's report, logged to its MLflow run and published as Prefect artifacts.

Also the readers that rebuild a report from MLflow alone (``optforge report RUN_ID``, ``optforge
compare``). A pipeline run's variants are its benchmark runs: the run ids in its
``optforge.stage.benchmark.run_id`` tag (a run whose stages all came from the cache points at the
runs of the run that computed them), else its child runs tagged ``optforge.stage=benchmark``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any

import mlflow
import yaml
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from prefect import task
from prefect.cache_policies import NO_CACHE

from optforge.tasks.runtime.refs import ModelRef, Registration, VariantResult
from optforge.tasks.runtime.tracking import PIPELINES, STAGE_TAG, TUNE_TRIAL_STAGE
from optforge.tasks.techniques.measurement.report import (
    COLUMNS,
    ReportData,
    formatted_rows,
    headline,
    render_markdown,
    write_report,
)
from optforge.tasks.techniques.measurement.selection import RegisterConfig, Selection, select_variant

ARTIFACT_DIR = "report"
SELECTION_FILE = "selection.json"  # written by tasks.stages.register


class ReportError(ValueError):
    """A run that cannot be reported on; the message says which and why."""


@dataclass(frozen=True)
class ReportRef:
    """Where the report's files are (``path`` is their folder, also logged as the run's ``report/`` artifacts)."""

    path: str
    markdown: str
    html: str
    plot: str


def get_pipeline_run(client: MlflowClient, run_id: str) -> Run:
    """The pipeline (parent) run ``run_id``, or a ``ReportError`` saying what the id is instead."""
    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        raise ReportError(f"no MLflow run '{run_id}' at {mlflow.get_tracking_uri()} ({exc.error_code})") from None
    tags = run.data.tags
    if tags.get("optforge.pipeline") not in PIPELINES:
        if "mlflow.parentRunId" in tags:
            raise ReportError(
                f"run {run_id} is a '{tags.get(STAGE_TAG, '?')}' stage run; its pipeline run is "
                f"{tags['mlflow.parentRunId']}"
            )
        raise ReportError(f"run {run_id} is not an optforge pipeline run (no tag optforge.pipeline, one of {PIPELINES})")
    return run


def _stage_runs(client: MlflowClient, run: Run, stage: str) -> list[Run]:
    ids = [i for i in run.data.tags.get(f"optforge.stage.{stage}.run_id", "").split(",") if i]
    if ids:
        return [client.get_run(i) for i in ids]
    found = client.search_runs(
        [run.info.experiment_id],
        order_by=["attributes.start_time ASC"],
        max_results=1000,
        filter_string=f"tags.mlflow.parentRunId = '{run.info.run_id}' and tags.`{STAGE_TAG}` = '{stage}'",
    )
    return list(found)


def benchmark_runs(client: MlflowClient, run: Run) -> list[Run]:
    """The runs that measured the pipeline run's variants, in benchmark order; for a tune run, then its
    finished trials (each trial's run carries its variant's metrics)."""
    return _stage_runs(client, run, "benchmark") + tune_trial_runs(client, run)


def tune_trial_runs(client: MlflowClient, run: Run) -> list[Run]:
    """A tune run's finished trials, in trial order; those a killed run of the same search finished included
    (they are that run's children, and the resumed search reports them again)."""
    search = run.data.tags.get("optforge.tune.search")
    if not search:
        return []
    found = client.search_runs([run.info.experiment_id], f"tags.`{STAGE_TAG}` = '{TUNE_TRIAL_STAGE}' and "
                               f"tags.`optforge.tune.search` = '{search}' and attributes.status = 'FINISHED'",
                               max_results=10_000)
    return sorted((r for r in found if "accuracy" in r.data.metrics), key=lambda r: r.info.run_name)


def register_run(client: MlflowClient, run: Run) -> Run | None:
    found = _stage_runs(client, run, "register")
    return found[-1] if found else None


def exit_curves(client: MlflowClient, run: Run) -> dict[str, dict]:
    """The early-exit stages' curves (``early_exit_curve.json``), by stage run name; {} when there are none."""
    curves = {}
    for stage_run in _stage_runs(client, run, "early_exit"):
        try:
            curves[stage_run.info.run_name] = mlflow.artifacts.load_dict(
                f"{stage_run.info.artifact_uri}/early_exit_curve.json")
        except Exception:  # a stage that failed before logging it: the report goes on without its curve
            continue
    return curves


def run_meta(client: MlflowClient, run: Run) -> tuple[str, dict[str, str]]:
    """Title and provenance lines of a pipeline run (nothing that changes after the run, e.g. its status)."""
    tags, started = run.data.tags, mlflow.utils.time.conv_longdate_to_str(run.info.start_time)[:16]
    title = f"optforge run {run.info.run_name} ({started} UTC)"
    meta = {
        "MLflow run": run.info.run_id,
        "experiment": client.get_experiment(run.info.experiment_id).name,
        "data fingerprint": tags.get("optforge.data_fingerprint", "?"),
        "config hash": tags.get("optforge.config_hash", "?"),
        "config": tags.get("optforge.config_path", "?"),
        "Prefect flow run": tags.get("prefect.flow_run_id", "?"),
    }
    return title, meta


def _config_from_params(params: dict[str, str]) -> RegisterConfig:
    raw = {}
    for name in RegisterConfig.model_fields:
        if f"register.{name}" in params:
            text = params[f"register.{name}"]
            raw[name] = None if text == "None" else yaml.safe_load(text)
    return RegisterConfig.from_dict(raw)


def load_report_data(client: MlflowClient, run_id: str) -> ReportData:
    """Everything ``optforge report`` shows, read back from MLflow alone.

    Raises:
        ReportError: the id is unknown, not a pipeline run, or the run benchmarked no variant.
    """
    run = get_pipeline_run(client, run_id)
    bench = benchmark_runs(client, run)
    if not bench:
        error = run.data.tags.get("optforge.error", "")
        raise ReportError(
            f"run {run_id} has no benchmarked variants (status {run.info.status}"
            + (f"; error: {error[:300]}" if error else "")
            + ")"
        )
    variants = {r.data.tags.get("optforge.variant", r.info.run_name): dict(r.data.metrics) for r in bench}
    formats = {
        r.data.tags.get("optforge.variant", r.info.run_name): r.data.tags.get("optforge.format", "?") for r in bench
    }
    title, meta = run_meta(client, run)
    meta |= {f"failed {r.data.tags.get('optforge.variant', r.info.run_name)}": r.data.tags["optforge.failed"]
             for r in bench if "optforge.failed" in r.data.tags}  # a chain or engine that raised (flows/isolation.py)
    reg_run = register_run(client, run)
    record = None
    if reg_run is not None:
        try:
            record = mlflow.artifacts.load_dict(f"{reg_run.info.artifact_uri}/{SELECTION_FILE}")
        except Exception:
            record = None
    if record is not None:
        return ReportData(
            title,
            variants,
            Selection.from_dict(record["selection"]),
            RegisterConfig.from_dict(record["config"]),
            record["registration"],
            formats,
            meta,
            exit_curves=exit_curves(client, run),
        )
    cfg = _config_from_params(run.data.params)
    tags = run.data.tags
    registration = {
        "variant": None if tags.get("optforge.registered", "none") == "none" else tags["optforge.registered"],
        "reason": tags.get("optforge.register_reason", "the run recorded no registration"),
    }
    return ReportData(
        title,
        variants,
        select_variant(variants, cfg, formats),
        cfg,
        registration,
        formats,
        meta,
        note="This run has no selection.json: the selection above was recomputed with the current rules.",
        exit_curves=exit_curves(client, run),
    )


def _registration_dict(registration: Registration) -> dict[str, Any]:
    return asdict(registration) if is_dataclass(registration) else dict(registration)


def _publish_prefect_artifacts(data: ReportData) -> None:
    """Table and markdown artifacts on the current flow run (skipped outside a Prefect run: nothing to attach to)."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact
    from prefect.context import FlowRunContext, TaskRunContext

    if FlowRunContext.get() is None and TaskRunContext.get() is None:
        return
    headers = [h for _, h, _ in COLUMNS]
    table = [dict(zip(headers, row)) for row in formatted_rows(data)]
    create_table_artifact(table=table, key="optforge-variants", description=headline(data))
    create_markdown_artifact(
        markdown=render_markdown(data, plot_ref=None),
        key="optforge-report",
        description="optforge run report: selection, registry decision, variants",
    )


# Not a cached stage (unlike the others): every pipeline run, even one whose stages all came from the
# cache, gets its own report on its own MLflow run.
@task(name="report", cache_policy=NO_CACHE, persist_result=False)
def report(
    cfg: RegisterConfig,
    results: list[VariantResult],
    variants: list[ModelRef],
    registration: Registration,
    workdir: str,
    parent_run_id: str | None,
) -> ReportRef:
    """Write the report under ``<workdir>/reports/<run id>/``, log it as the run's ``report/`` artifacts, publish it.

    With a parent run, the report is built from what MLflow recorded (``load_report_data``), exactly as
    ``optforge report RUN_ID`` rebuilds it later; the in-memory inputs serve runs without tracking.
    """
    client = MlflowClient()
    if parent_run_id:
        data = load_report_data(client, parent_run_id)
    else:
        formats = {v.name: v.format for v in variants}
        metrics = {r.name: r.metrics for r in results}
        data = ReportData(
            "optforge run",
            metrics,
            select_variant(metrics, cfg, formats),
            cfg,
            _registration_dict(registration),
            formats,
        )
    files = write_report(data, Path(workdir).resolve() / "reports" / (parent_run_id or "local"))
    if parent_run_id:
        client.log_artifacts(parent_run_id, str(files.folder), ARTIFACT_DIR)
        client.set_tag(parent_run_id, "optforge.report", f"{ARTIFACT_DIR}/{files.html.name}")
    _publish_prefect_artifacts(data)
    return ReportRef(str(files.folder), str(files.markdown), str(files.html), str(files.plot))
