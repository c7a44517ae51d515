"""One trial of ``optforge tune``: a chain over the trained teacher, built and benchmarked in a Ray Tune process.

``run_trial`` is Ray Tune's function trainable. It runs the ``tune-trial`` Prefect flow (one flow run per
trial in the Prefect UI, on the search's Prefect API) and that flow runs the trial's chain through the
same stage tasks, stage runner and stage cache as ``optforge run``: a prefix that another trial or an
earlier run built (the same distilled student, the same pruned model) comes from the cache.

MLflow: each trial is a child run of the tune run (stage ``tune_trial``), named after its variant, with
its picked settings as params and, once benchmarked, the pipeline's variant metrics (``accuracy``,
``latency_ms_p50_b1``, ``size_mb``, ...), so the MLflow UI compares trials as it compares variants. The
steps' and the benchmark's runs nest under it.

Timing: steps run under ``idle.building`` and the benchmark under ``idle.timing``, so a trial is timed
only while no other trial on the host builds, and one trial at a time.

The run's ``optforge.tune.outcome`` tag (done or failed here, stopped by the scheduler in the driver) marks a
settled trial: a resumed search skips it. A trial that was killed or ran out of budget has none and runs again.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, replace
from enum import StrEnum

import mlflow
from prefect import flow
from prefect.runtime import flow_run
from ray import tune

from optforge.flows.chain_config import expand, product_name
from optforge.flows.chains import chain_variants
from optforge.flows.optimize import StageRunner
from optforge.flows.params import apply_overrides, validate
from optforge.flows.tune_config import trial_overrides
from optforge.tasks.runtime.idle import building, timing
from optforge.tasks.runtime.progress import epoch_listener
from optforge.tasks.runtime.refs import DataRef, ModelRef
from optforge.tasks.runtime.tracking import TUNE_TRIAL_STAGE, child_run, configure, process_tags
from optforge.tasks.stages.benchmark import benchmark

VARIANT_FILE = "tune_variant.json"  # the trial's ModelRef, on its run: what the search registers from
OUTCOME_TAG = "optforge.tune.outcome"  # done | stopped | failed: a settled trial, not run again on resume


class Outcome(StrEnum):
    """What became of a trial: the first three are settled (recorded on its run); ``not run``: the search ended
    before it started."""

    DONE = "done"
    STOPPED = "stopped"
    FAILED = "failed"
    NOT_RUN = "not run"


@dataclass(frozen=True)
class SearchContext:
    """What every trial of one search shares (handed to trials with ``tune.with_parameters``)."""

    base: dict  # the planned pipeline config, as a dict; a trial applies its overrides to it
    teacher: dict  # the trained teacher's ModelRef, as a dict
    data: dict  # the DataRef, as a dict
    parent_run_id: str  # the tune run
    experiment: str
    tracking_uri: str
    prefect_api_url: str | None
    workdir: str
    lock_dir: str
    search: str  # the search's folder name (its key): tags every trial run, so a resumed search finds them


PREFECT_RUN_TAG = "prefect.flow_run_id"  # the trial's Prefect flow run, which the search cancels if it stops the trial


def trial_name(index: int, chain) -> str:
    """``t03_prune_int8``: the trial's place in the search's draw and its chain's product; the variant's name in
    every table."""
    return f"t{index:02d}_{product_name(expand(chain), '_')}"


class _Building:
    """The stage runner, with each chain step under the shared build lock."""

    def __init__(self, stage: StageRunner, lock_dir: str):
        self.stage, self.lock_dir = stage, lock_dir

    def __call__(self, task, **kwargs):
        with building(self.lock_dir):
            return self.stage(task, **kwargs)


def _report_epochs(run_id: str):
    """Forward each fine-tuning epoch to Ray Tune (the floor scheduler reads ``val_accuracy``)."""

    def report(label: str, event: dict) -> None:
        if "val_accuracy" in event["metrics"]:
            tune.report({"val_accuracy": event["metrics"]["val_accuracy"], "phase": label, "epoch": event["epoch"],
                         "epochs": event["epochs"], "mlflow_run_id": run_id})

    return report


@flow(name="tune-trial", validate_parameters=False)
def tune_trial(ctx: SearchContext, index: int, chain: list[str], values: dict) -> dict:
    """Build the trial's chain, benchmark it, log it; return its final metrics for Ray Tune.

    The run's ``optforge.tune.outcome`` tag (done, failed; stopped is set by the scheduler) is what a resumed
    search reads to skip a settled trial.
    """
    name = trial_name(index, chain)
    overrides = [*trial_overrides(values), f"compress.chains={json.dumps([list(chain)])}"]
    configure(ctx.experiment)
    tags = {"optforge.variant": name, "optforge.chain": ">".join(chain), "optforge.tune.search": ctx.search,
            "optforge.tune.trial": str(index), PREFECT_RUN_TAG: str(flow_run.get_id() or ""), **process_tags()}
    with child_run(ctx.parent_run_id, TUNE_TRIAL_STAGE, run_name=name, tags=tags,
                   params={"chain": ">".join(chain), **values}) as run:
        run_id = run.info.run_id
        try:
            result, variant = _build_and_time(ctx, name, overrides, run_id)
        except Exception:  # an error of the trial's own (not Ray Tune's SystemExit when it stops the trial)
            mlflow.set_tag(OUTCOME_TAG, Outcome.FAILED)
            raise
        mlflow.log_metrics(result.metrics)
        mlflow.log_dict(asdict(variant), VARIANT_FILE)
        mlflow.set_tags({"optforge.format": str(variant.format), OUTCOME_TAG: Outcome.DONE,
                         **{f"optforge.{k}": str(v) for k, v in variant.info.get("lineage", {}).items()}})
    return {**result.metrics, "benchmarked": 1, "mlflow_run_id": run_id}


def _build_and_time(ctx: SearchContext, name: str, overrides: list[str], run_id: str):
    """The chain through the stage runner (shared build lock), then the benchmark (exclusive timing lock)."""
    cfg = validate(apply_overrides(ctx.base, overrides))  # a bad combination fails this trial, named
    teacher, data = ModelRef(**ctx.teacher), DataRef(**ctx.data)
    stage = StageRunner(force=False, parent_run_id=run_id)
    with epoch_listener(_report_epochs(run_id)):
        (variant,) = chain_variants(cfg, teacher, data, ctx.workdir, _Building(stage, ctx.lock_dir), isolate=False)
    variant = replace(variant, name=name)
    with timing(ctx.lock_dir):
        (result,) = stage(benchmark, cfg=cfg.benchmark, variants=[variant], data=data)
    bad = [k for k, v in result.metrics.items() if not math.isfinite(v) and k != "flops"]
    if bad:
        raise ValueError(f"trial {name}: the benchmark measured non-finite {', '.join(bad)} (a model that "
                         "diverged, or one that could not run)")
    return result, variant


def run_trial(config: dict, ctx: SearchContext) -> None:
    """Ray Tune's trainable: one trial, reported to Tune; an error fails the trial (recorded), not the search."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    os.environ["MLFLOW_TRACKING_URI"] = ctx.tracking_uri  # Ray starts a trial in its own folder
    updates = {PREFECT_API_URL: ctx.prefect_api_url} if ctx.prefect_api_url else {}
    with temporary_settings(updates=updates):
        trial = config["trial"]
        final = tune_trial(ctx, trial["index"], trial["chain"], trial["values"])
    tune.report(final)
