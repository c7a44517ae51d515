"""The tune flow: train the teacher once, search chains and settings with Ray Tune, register the best trial.

Wiring only, like ``optimize``. The search:

1. data, plan and the teacher through the stage cache (shared with ``optforge run``), and the teacher's
   benchmark, which the goals compare against;
2. Ray Tune trials (``flows/tune_trial.py``) drawn at random from ``tune.chains`` x ``tune.space``,
   ``tune.max_concurrent`` at a time, each one chain over the teacher; the floor scheduler
   (``tasks/tune_scheduler.py``) stops those whose fine-tuning cannot reach the accuracy floor;
3. the Pareto front over (accuracy, latency, size) of the finished trials, the register stage's
   champion/challenger rule over them and the teacher, and the run report (front included).

Ray Tune keeps the search's state under ``<workdir>/tune/<search key>``; the key covers the teacher,
the data and every setting that shapes a trial, so a killed ``optforge tune`` with the same config
resumes there (finished trials are not run again) and a changed one starts a new search.
"""

# No ``from __future__ import annotations``: Prefect builds the flow's parameter model from the signature.
import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import mlflow
from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from optforge.flows.optimize import StageRunner, pipeline_run, prepare, train_teacher
from optforge.flows.params import ConfigError, PipelineConfig, apply_overrides, load_config, validate
from optforge.flows.tune_config import TUNE_CHAINS, default_space, draw_trials, trial_overrides
from optforge.flows.tune_trial import OUTCOME_TAG, VARIANT_FILE, SearchContext, run_trial, trial_name
from optforge.tasks.benchmark import benchmark
from optforge.tasks.refs import ModelRef, VariantResult
from optforge.tasks.register import hash_config, register
from optforge.tasks.report import report
from optforge.tasks.techniques.pareto import pareto_front
from optforge.tasks.techniques.selection import accuracy_floor
from optforge.tasks.tracking import flatten, tracking_uri
from optforge.tasks.tune_scheduler import FloorScheduler
from optforge.tasks.worker_common import ensure_ray

# A trial's Ray resources: none of the CPUs, which its steps' own Ray Train workers need (a trial that
# held one would starve a distillation's workers on a small machine). Ray Tune requires some resource.
TRIAL_RESOURCES = {"memory": 1 << 20}
STOPPED_TAG = "optforge.tune.stopped"  # why a trial was stopped (the floor scheduler's reason, or the budget)


@flow(name="tune")
def tune(config_path: str | None = None, overrides: list[str] | None = None, force: bool = False) -> dict:
    """Search the compression space (module docstring); return the trials, the front and the registration.

    Args:
        config_path: a YAML pipeline config; its ``tune:`` section is the search.
        overrides: ``KEY=VALUE`` strings on top of it (the CLI's ``--set``).
        force: start the search over instead of resuming the one the same config left unfinished.
    """
    with pipeline_run("tune", config_path, overrides, None) as parent_run_id:
        summary = _search(load_config(config_path, overrides), force, parent_run_id)
        mlflow.log_text(json.dumps(summary, indent=2, default=str), "tune_summary.json")
    return summary


def _space(cfg: PipelineConfig, base: dict) -> dict[str, list]:
    """The space to search, each value checked on top of the base config (a bad one is named before any trial;
    a combination that does not fit a chain fails that trial only)."""
    space = cfg.tune.space if cfg.tune.space is not None else default_space(cfg)
    base = apply_overrides(base, ["compress.chains=[]"])
    for key, values in space.items():
        for value in values:
            try:
                validate(apply_overrides(base, trial_overrides({key: value})))
            except ConfigError as exc:
                raise ConfigError(f"tune.space.{key}: the value {value!r} is not valid there ({exc})") from None
    return space


def _with_menu(cfg: PipelineConfig) -> PipelineConfig:
    """The config with the chain menu as its chains, for the plan to keep those that apply to this model."""
    chains = tuple(cfg.tune.chains or TUNE_CHAINS)
    return cfg.model_copy(update={"compress": cfg.compress.model_copy(update={"chains": chains})})


def _prefect_api_url() -> str | None:
    """The API this flow reports to (the ephemeral one included), for the trials' flow runs."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return str(client.api_url)


def _record_stop(result: dict, reason: str) -> None:
    """The floor scheduler stopped a trial: a settled outcome, with its reason, on the trial's run."""
    run_id = result.get("mlflow_run_id")
    if run_id:
        client = mlflow.MlflowClient()
        client.set_tag(run_id, OUTCOME_TAG, "stopped")
        client.set_tag(run_id, STOPPED_TAG, reason[:5000])


def _tuner(cfg: PipelineConfig, ctx: SearchContext, todo: list[dict], floor_val: float, folder: Path):
    """A Ray Tune search over the trials still to run, in its own folder under the search's."""
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    t = cfg.tune
    trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx), TRIAL_RESOURCES)
    scheduler = FloorScheduler(floor_val, t.stop_margin, _record_stop) if t.scheduler == "floor" else None
    # The trials are drawn by the flow (distinct, seeded) and handed to Ray Tune as a grid of one key.
    param_space = {"trial": tune.grid_search(todo)}
    # reuse_actors: a trial's process has imported torch, Prefect and MLflow already (8-10 s each time here).
    tune_cfg = tune.TuneConfig(num_samples=1, time_budget_s=t.time_budget_s, scheduler=scheduler, reuse_actors=True,
                               search_alg=BasicVariantGenerator(max_concurrent=t.max_concurrent))
    run_cfg = tune.RunConfig(name=time.strftime("run-%Y%m%d-%H%M%S"), storage_path=str(folder), verbose=0,
                             failure_config=tune.FailureConfig(max_failures=0, fail_fast=False))
    return tune.Tuner(trainable, param_space=param_space, tune_config=tune_cfg, run_config=run_cfg)


VARIANT_METRICS = ("accuracy", "latency_ms_p50_b1", "latency_ms_p95_b1", "latency_ms_mean_b1", "throughput_sps_b64",
                   "size_mb", "params", "flops")
BUDGET = "the search's time budget ran out, or the search was stopped, before the trial finished"


def _trial_runs(experiment_id: str, search: str) -> dict[int, object]:
    """The latest MLflow run of each trial of this search, by its index in the draw."""
    runs = mlflow.MlflowClient().search_runs(
        [experiment_id], f"tags.`optforge.tune.search` = '{search}'", order_by=["attributes.start_time ASC"],
        max_results=10_000)
    return {int(r.data.tags["optforge.tune.trial"]): r for r in runs if "optforge.tune.trial" in r.data.tags}


def _row(trial: dict, run, error: str | None = None) -> dict:
    """One trial's outcome from its MLflow run: done (metrics, variant), stopped (why), failed (the error) or not
    run (the budget ended first)."""
    row = {"index": trial["index"], "trial": trial_name(trial["index"], trial["chain"]),
           "chain": ">".join(trial["chain"]), "values": trial["values"],
           "mlflow_run_id": run.info.run_id if run else None}
    tags = run.data.tags if run else {}
    outcome = tags.get(OUTCOME_TAG) or ("failed" if error else "stopped" if run else "not run")
    row["status"] = outcome
    if outcome == "done":
        row["metrics"] = {k: float(v) for k, v in run.data.metrics.items() if k in VARIANT_METRICS}
        row["variant"] = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/{VARIANT_FILE}")
    elif outcome == "failed":
        row["error"] = error or tags.get("optforge.error", "unknown error")
    else:
        row["reason"] = tags.get(STOPPED_TAG) or BUDGET
    return row


def _errors(grid) -> dict[int, str]:
    """The exception of each trial that raised, by index (Ray wraps the trial's own exception: unwrap it)."""
    out = {}
    for result in grid:
        trial = (result.config or {}).get("trial")
        if result.error is not None and trial:
            cause = getattr(result.error, "cause", None) or result.error
            out[trial["index"]] = f"{type(cause).__name__}: {cause}"[:2000]
    return out


def _close_stopped(rows: list[dict]) -> None:
    """End the MLflow runs of stopped trials KILLED, with the reason.

    Ray Tune ends a stopped trial's process with ``SystemExit``: its runs are FAILED with that as their error
    (or still RUNNING, if the process died first); neither says what happened.
    """
    client = mlflow.MlflowClient()
    for row in rows:
        if row["status"] != "stopped" or not row["mlflow_run_id"]:
            continue
        run = client.get_run(row["mlflow_run_id"])
        client.set_tag(run.info.run_id, STOPPED_TAG, row["reason"][:5000])
        for r in [*_unfinished_descendants(client, run), run]:
            if r.info.status != "KILLED":
                client.set_terminated(r.info.run_id, status="KILLED")
            for tag in ("optforge.error", "optforge.error_type"):
                if tag in r.data.tags:
                    client.delete_tag(r.info.run_id, tag)


def _unfinished_descendants(client, run) -> list:
    """A stopped trial's step runs that did not finish, at any depth."""
    found = []
    for child in client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}' and "
                                    "attributes.status != 'FINISHED'"):
        found += [*_unfinished_descendants(client, child), child]
    return found


def _search(cfg: PipelineConfig, force: bool, parent_run_id: str) -> dict:
    logger = get_run_logger()
    started = time.perf_counter()
    if cfg.model.arch == "onnx":
        raise ConfigError("model.arch: optforge tune compresses a PyTorch model; an ONNX model (model.arch=onnx) has "
                          "no chain to search (use optforge run)")
    mlflow.log_params(flatten({"tune": cfg.tune.to_dict()}))
    workdir = str(Path(cfg.tracking.workdir).resolve())
    stage = StageRunner(force=False, parent_run_id=parent_run_id)
    data, run_plan = prepare(_with_menu(cfg), workdir, stage)  # logs the chains it drops, with why
    cfg, skipped, menu = run_plan.cfg, run_plan.skipped, run_plan.cfg.compress.chains
    if not menu:
        raise ConfigError("tune.chains: no chain of the menu applies to this model: "
                          + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
    base = cfg.to_dict()
    space = _space(cfg, base)
    teacher = train_teacher(cfg, workdir, stage, data)
    (baseline,) = stage(benchmark, cfg=cfg.benchmark, variants=[teacher], data=data)
    floor = accuracy_floor(baseline.metrics["accuracy"], cfg.register)
    # The scheduler sees validation accuracy: the same allowance below the teacher's validation accuracy.
    floor_val = teacher.info.get("best_val_accuracy", baseline.metrics["accuracy"]) - (baseline.metrics["accuracy"] - floor)
    drawn = [{"index": i, **t} for i, t in enumerate(draw_trials(menu, space, cfg.tune.trials, cfg.tune.seed))]
    # The budget and concurrency (tune.*) may change on resume; what the trials build may not.
    key = hash_config({"data": data.sha256, "teacher": teacher.sha256, "trials": drawn,
                       "base": {k: v for k, v in base.items() if k != "tune"}})[:16]
    path = Path(workdir) / "tune" / f"search-{key}"
    lock_dir = str(Path(workdir) / "tune" / "locks")
    ctx = SearchContext(base=base, teacher=asdict(teacher), data=asdict(data), parent_run_id=parent_run_id,
                        experiment=cfg.tracking.experiment, tracking_uri=tracking_uri(),
                        prefect_api_url=_prefect_api_url(), workdir=workdir, lock_dir=lock_dir, search=path.name)
    mlflow.log_dict({"chains": [list(c) for c in menu], "space": space, "not_searched": skipped, "trials": drawn},
                    "tune_space.json")
    mlflow.set_tags({"optforge.tune.search": path.name, "optforge.tune.search_dir": str(path),
                     "optforge.tune.floor": f"{floor:.4f}"})
    experiment_id = mlflow.get_experiment_by_name(cfg.tracking.experiment).experiment_id
    # Resume: the trials an earlier run of this search settled (done, stopped by the scheduler, failed) are not
    # run again; those it left unfinished (killed, or out of budget) are. MLflow holds the outcomes.
    earlier = {} if force else {i for i, r in _trial_runs(experiment_id, path.name).items()
                                if r.data.tags.get(OUTCOME_TAG)}
    todo = [t for t in drawn if t["index"] not in earlier]
    resumed = bool(earlier)
    mlflow.set_tag("optforge.tune.resumed", str(resumed).lower())
    logger.info("%s search %s: %d of %d trial(s) to run, over %d chain(s) and %d setting(s), floor %.2f%%",
                "resuming" if resumed else "starting", path.name, len(todo), len(drawn), len(menu), len(space), floor)
    errors = {}
    if todo:
        ensure_ray()
        errors = _errors(_tuner(cfg, ctx, todo, floor_val, path).fit())
    runs = _trial_runs(experiment_id, path.name)
    trials = [_row(t, runs.get(t["index"]), errors.get(t["index"])) for t in drawn]
    _close_stopped(trials)

    done = [t for t in trials if t["status"] == "done"]
    variants = [teacher] + [ModelRef(**t["variant"]) for t in done]
    results = [baseline] + [VariantResult(t["trial"], t["metrics"], t["mlflow_run_id"]) for t in done]
    latency = cfg.register.latency_metric
    metrics = {r.name: r.metrics for r in results if all(math.isfinite(r.metrics.get(k, math.nan))
                                                         for k in ("accuracy", latency, "size_mb"))}
    front = pareto_front(metrics, latency)
    registration = stage(register, cfg=cfg.register, results=results, variants=variants, data=data,
                         config_hash=hash_config(base))
    report_ref = report(cfg=cfg.register, results=results, variants=variants, registration=registration,
                        workdir=workdir, parent_run_id=parent_run_id)
    counts = {s: sum(t["status"] == s for t in trials) for s in ("done", "stopped", "failed", "not run")}
    mlflow.log_metrics({f"trials_{s.replace(' ', '_')}": n for s, n in counts.items()}
                       | {"tune_seconds": time.perf_counter() - started})
    mlflow.set_tags({"optforge.tune.front": ",".join(front), "optforge.registered": registration.variant or "none",
                     "optforge.register_reason": registration.reason})
    rows = [{"trial": t["trial"], "status": t["status"], "chain": t["chain"],
             "settings": json.dumps(t["values"]), "on_front": t["trial"] in front,
             **{k: t.get("metrics", {}).get(k) for k in ("accuracy", latency, "size_mb")},
             "why": t.get("reason") or t.get("error") or ""} for t in trials]
    create_table_artifact(table=rows, key="optforge-tune-trials",
                          description=f"{counts['done']} trial(s) done, {counts['stopped']} stopped, {counts['failed']} "
                          f"failed, {counts['not run']} not run; Pareto front: {', '.join(front)}")
    return {"parent_run_id": parent_run_id, "search": str(path), "resumed": resumed, "floor": floor,
            "baseline": {"name": baseline.name, **baseline.metrics}, "trials": trials, "front": list(front),
            "registration": {"variant": registration.variant, "model_name": registration.model_name,
                             "version": registration.version, "reason": registration.reason,
                             "alias": getattr(registration, "alias", None)},
            "not_searched": skipped, "report": report_ref.html, "seconds": round(time.perf_counter() - started, 1)}
