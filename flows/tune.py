"""The tune flow: train the teacher once, search chains and settings with Ray Tune, register the best trial.

Wiring only, like ``optimize``. The search:

1. data, plan and the teacher through the stage cache (shared with ``optforge run``), and the teacher's
   benchmark, which the goals compare against;
2. Ray Tune trials (``flows/tune_trial.py``) drawn at random from ``tune.chains`` x ``tune.space``,
   ``tune.max_concurrent`` at a time, each one chain over the teacher; the floor scheduler
   (``tasks/workers/tune_scheduler.py``) stops those whose fine-tuning cannot reach the accuracy floor;
3. the Pareto front over (accuracy, latency, size) of the finished trials, the register stage's
   champion/challenger rule over them and the teacher, and the run report (front included).

A search is named by a key over the teacher, the data and the drawn trials (``<workdir>/tune/search-<key>``,
where Ray Tune writes each run's files). MLflow holds each trial's outcome, so ``optforge tune`` again with
the same config resumes: settled trials (done, stopped by the scheduler, failed) are not run again; those a
kill interrupted or the budget never reached are. ``--force`` moves the search to a new generation.
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

from optforge.flows.chain_config import expand, product_name
from optforge.flows.optimize import StageRunner, pipeline_run, prepare, train_teacher
from optforge.flows.params import ConfigError, PipelineConfig, apply_overrides, load_config, validate
from optforge.flows.tune_config import TUNE_CHAINS, default_space, draw_trials, trial_overrides
from optforge.flows.tune_trial import (
    OUTCOME_TAG,
    PREFECT_RUN_TAG,
    VARIANT_FILE,
    Outcome,
    SearchContext,
    run_trial,
    trial_name,
)
from optforge.tasks.runtime.idle import host_locks
from optforge.tasks.runtime.refs import ModelRef, VariantResult
from optforge.tasks.runtime.tracking import descendants, flatten, tracking_uri
from optforge.tasks.stages.benchmark import TIMED, benchmark
from optforge.tasks.stages.register import hash_config, register
from optforge.tasks.stages.report import report
from optforge.tasks.techniques.measurement.pareto import pareto_front
from optforge.tasks.techniques.measurement.selection import accuracy_floor
from optforge.tasks.workers.tune_scheduler import FloorScheduler
from optforge.tasks.workers.worker_common import ensure_ray

# A trial's Ray resources: none of the CPUs, which its steps' own Ray Train workers need (a trial that
# held one would starve a distillation's workers on a small machine). Ray Tune requires some resource.
TRIAL_RESOURCES = {"memory": 1 << 20}
STOPPED_TAG = "optforge.tune.stopped"  # why a trial was stopped (the floor scheduler's reason, or the budget)


@flow(name="tune")
def tune(config_path: str | None = None, overrides: list[str] | None = None, force: bool = False,
         config: PipelineConfig | None = None) -> dict:
    """Search the compression space (module docstring); return the trials, the front and the registration.

    Args:
        config_path: a YAML pipeline config; its ``tune:`` section is the search.
        overrides: ``KEY=VALUE`` strings on top of it (the CLI's ``--set``).
        force: start the search over instead of resuming the one the same config left unfinished.
        config: the pipeline config, typed, instead of ``config_path`` (the Python API's ``optforge.tune``).
    """
    with pipeline_run("tune", config_path, overrides, config) as parent_run_id:
        summary = _search(load_config(config_path, overrides, config), force, parent_run_id)
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


def _students(cfg: PipelineConfig, data, space: dict, menu, skipped: dict):
    """The distillation chains under each student the space names (the plan judged them with the config's own
    student): the menu with those that apply under some student, a check of (chain, values), and what was
    skipped under every student."""
    from itertools import product

    from optforge.flows.plan import plan

    keys = [k for k in space if k.startswith("compress.distill.")]
    distill_chains = tuple(c for c in (cfg.tune.chains or TUNE_CHAINS) if "distill" in c)
    if not keys or not distill_chains:
        return menu, None, skipped
    base = apply_overrides(cfg.to_dict(), [f"compress.chains={json.dumps([list(c) for c in distill_chains])}"])
    kept: dict[tuple, set] = {}
    for combo in product(*(space[k] for k in keys)):
        student = dict(zip(keys, combo))
        planned = plan(validate(apply_overrides(base, trial_overrides(student))), data.inputs, data.name)
        kept[tuple(sorted((k, json.dumps(v)) for k, v in student.items()))] = set(planned.cfg.compress.chains)

    def allowed(chain: tuple, values: dict) -> bool:
        if "distill" not in chain:
            return True
        return chain in kept[tuple(sorted((k, json.dumps(values[k])) for k in keys))]

    admitted = set().union(*kept.values())
    menu = tuple(c for c in menu if "distill" not in c) + tuple(c for c in distill_chains if c in admitted)
    names = {product_name(expand(c), "_") for c in admitted}
    return menu, allowed, {k: v for k, v in skipped.items() if k not in names}


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
        client.set_tag(run_id, OUTCOME_TAG, Outcome.STOPPED)
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
    # No actor reuse: stopping a trial whose distillation runs on Ray Train cannot interrupt that fit from the
    # reporting thread; ending the trial's process does (its Ray Train actors go with it). It costs a process
    # start per trial (8-10 s of imports here).
    tune_cfg = tune.TuneConfig(num_samples=1, time_budget_s=t.time_budget_s, scheduler=scheduler, reuse_actors=False,
                               search_alg=BasicVariantGenerator(max_concurrent=t.max_concurrent))
    run_cfg = tune.RunConfig(name=time.strftime("run-%Y%m%d-%H%M%S"), storage_path=str(folder), verbose=0,
                             failure_config=tune.FailureConfig(max_failures=0, fail_fast=False))
    return tune.Tuner(trainable, param_space=param_space, tune_config=tune_cfg, run_config=run_cfg)


VARIANT_METRICS = (*TIMED, "params", "flops")  # what the benchmark stage logs for every variant
BUDGET = "the search's time budget ran out, or the search was stopped, before the trial finished"


def _trial_runs(experiment_id: str, search: str) -> dict[int, object]:
    """The latest MLflow run of each trial of this search, by its index in the draw."""
    runs = mlflow.MlflowClient().search_runs(
        [experiment_id], f"tags.`optforge.tune.search` = '{search}'", order_by=["attributes.start_time ASC"],
        max_results=10_000)
    return {int(r.data.tags["optforge.tune.trial"]): r for r in runs if "optforge.tune.trial" in r.data.tags}


def _row(trial: dict, run, error: str | None, parent_run_id: str) -> dict:
    """One trial's outcome: a settled one from its MLflow run (done: metrics and variant; stopped by the
    scheduler: why; failed: the error), else what this search's Ray Tune run made of it (an error, a stop by
    the budget, or never started)."""
    row = {"index": trial["index"], "trial": trial_name(trial["index"], trial["chain"]),
           "chain": ">".join(trial["chain"]), "values": trial["values"],
           "mlflow_run_id": run.info.run_id if run else None}
    tags = run.data.tags if run else {}
    ours = run is not None and tags.get("mlflow.parentRunId") == parent_run_id
    if error:
        outcome = Outcome.FAILED
    elif tags.get(OUTCOME_TAG):
        outcome = Outcome(tags[OUTCOME_TAG])
    else:  # unsettled: stopped by the budget if this run started it, else it never got to it
        outcome = Outcome.STOPPED if ours else Outcome.NOT_RUN
    row["status"] = outcome
    if outcome == Outcome.DONE:
        row["metrics"] = {k: float(v) for k, v in run.data.metrics.items() if k in VARIANT_METRICS}
        row["variant"] = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/{VARIANT_FILE}")
    elif outcome == Outcome.FAILED:
        row["error"] = error or tags.get("optforge.error", "unknown error")
    else:
        row["reason"] = tags.get(STOPPED_TAG) or BUDGET
        if outcome == Outcome.NOT_RUN:
            row["mlflow_run_id"] = None  # an earlier, killed run's: not this search's to close
    return row


def _generation(path: Path, force: bool) -> str:
    """The search's name in MLflow: its folder's name and a generation that ``--force`` moves on, so a forced
    search starts with no settled trial and its report shows only its own."""
    path.mkdir(parents=True, exist_ok=True)
    counter = path / "generation"
    number = int(counter.read_text()) if counter.exists() else 0
    if force:
        number += 1
        counter.write_text(str(number))
    return f"{path.name}-g{number}"


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
    """End the MLflow runs of stopped trials KILLED and their Prefect flow runs Cancelled, with the reason.

    Ray Tune ends a stopped trial's process with ``SystemExit``: its runs are FAILED with that as their error
    and its flow run Crashed ("aborted by Python system exit call"), or all still RUNNING if the process died
    first; none of which says what happened.
    """
    client = mlflow.MlflowClient()
    for row in rows:
        if row["status"] != Outcome.STOPPED or not row["mlflow_run_id"]:
            continue
        run = client.get_run(row["mlflow_run_id"])
        client.set_tag(run.info.run_id, STOPPED_TAG, row["reason"][:5000])
        for r in [*descendants(client, run.info.experiment_id, run.info.run_id, "!= 'FINISHED'"), run]:
            if r.info.status != "KILLED":
                client.set_terminated(r.info.run_id, status="KILLED")
            for tag in ("optforge.error", "optforge.error_type"):
                if tag in r.data.tags:
                    client.delete_tag(r.info.run_id, tag)
        if run.data.tags.get(PREFECT_RUN_TAG):  # an earlier, killed search's stops too: it never got here
            _cancel_flow_run(run.data.tags[PREFECT_RUN_TAG], f"stopped by optforge tune: {row['reason']}")


def _cancel_flow_run(flow_run_id: str, message: str) -> None:
    """Move a stopped trial's flow run to Cancelled (forced: it may be Crashed, or Running with no process).

    Best effort, as the search's result does not depend on it. A flow run this Prefect API does not hold is
    left alone: an earlier run of the search may have reported to another (the CLI against a server, then the
    Python API on a temporary one), or the server's history was pruned.
    """
    import httpx
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.states import Cancelled

    try:
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(flow_run_id).state
            if state is None or not state.is_cancelled():
                client.set_flow_run_state(flow_run_id, Cancelled(message=message[:2000]), force=True)
    except ObjectNotFound:
        return
    except (httpx.HTTPError, ValueError) as exc:  # the server unreachable or refusing, a malformed id
        get_run_logger().warning("could not mark the stopped trial's flow run %s Cancelled: %s", flow_run_id, exc)


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
    base = cfg.to_dict()
    space = _space(cfg, base)
    menu, allowed, skipped = _students(cfg, data, space, menu, skipped)
    if not menu:
        raise ConfigError("tune.chains: no chain of the menu applies to this model: "
                          + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
    teacher = train_teacher(cfg, workdir, stage, data)
    (baseline,) = stage(benchmark, cfg=cfg.benchmark, variants=[teacher], data=data)
    floor = accuracy_floor(baseline.metrics["accuracy"], cfg.register)
    # The scheduler sees validation accuracy: the same allowance below the teacher's validation accuracy.
    floor_val = teacher.info.get("best_val_accuracy", baseline.metrics["accuracy"]) - (baseline.metrics["accuracy"] - floor)
    drawn = [{"index": i, **t} for i, t in enumerate(draw_trials(menu, space, cfg.tune.trials, cfg.tune.seed, allowed))]
    # The budget and concurrency (tune.*) may change on resume; what the trials build may not.
    key = hash_config({"data": data.sha256, "teacher": teacher.sha256, "trials": drawn,
                       "base": {k: v for k, v in base.items() if k != "tune"}})[:16]
    path = Path(workdir) / "tune" / f"search-{key}"
    search = _generation(path, force)
    ctx = SearchContext(base=base, teacher=asdict(teacher), data=asdict(data), parent_run_id=parent_run_id,
                        experiment=cfg.tracking.experiment, tracking_uri=tracking_uri(),
                        prefect_api_url=_prefect_api_url(), workdir=workdir, lock_dir=str(host_locks()),
                        search=search)
    mlflow.log_dict({"chains": [list(c) for c in menu], "space": space, "not_searched": skipped, "trials": drawn},
                    "tune_space.json")
    mlflow.set_tags({"optforge.tune.search": search, "optforge.tune.search_dir": str(path),
                     "optforge.tune.floor": f"{floor:.4f}"})
    experiment_id = mlflow.get_experiment_by_name(cfg.tracking.experiment).experiment_id
    # Resume: the trials an earlier run of this search settled (done, stopped by the scheduler, failed) are not
    # run again; those it left unfinished (killed, or out of budget) are. MLflow holds the outcomes.
    earlier = {i for i, r in _trial_runs(experiment_id, search).items() if r.data.tags.get(OUTCOME_TAG)}
    todo = [t for t in drawn if t["index"] not in earlier]
    resumed = bool(earlier)
    mlflow.set_tag("optforge.tune.resumed", str(resumed).lower())
    logger.info("%s search %s: %d of %d trial(s) to run, over %d chain(s) and %d setting(s), floor %.2f%%",
                "resuming" if resumed else "starting", search, len(todo), len(drawn), len(menu), len(space), floor)
    errors = {}
    if todo:
        ensure_ray()
        errors = _errors(_tuner(cfg, ctx, todo, floor_val, path).fit())
    runs = _trial_runs(experiment_id, search)
    trials = [_row(t, runs.get(t["index"]), errors.get(t["index"]), parent_run_id) for t in drawn]
    _close_stopped(trials)

    done = [t for t in trials if t["status"] == Outcome.DONE]
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
    counts = {str(o): sum(t["status"] == o for t in trials) for o in Outcome}
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
