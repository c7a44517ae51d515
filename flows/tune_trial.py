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
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, replace

import mlflow
from prefect import flow
from ray import tune

from optforge.flows.chain_config import expand, product_name
from optforge.flows.chains import OnnxSteps, chain_variants
from optforge.flows.optimize import StageRunner
from optforge.flows.params import apply_overrides, validate
from optforge.flows.tune_config import trial_overrides
from optforge.tasks.benchmark import benchmark
from optforge.tasks.idle import building, timing
from optforge.tasks.progress import epoch_listener
from optforge.tasks.refs import DataRef, ModelRef
from optforge.tasks.report import TUNE_TRIAL_STAGE
from optforge.tasks.tracking import child_run, configure, process_tags

VARIANT_FILE = "tune_variant.json"  # the trial's ModelRef, on its run: what a resumed search registers from


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


def trial_name(trial_id: str, chain) -> str:
    """``t03_prune_int8``: the trial's number in the search (Ray Tune's ids end in it: ``<search>_00003``) and its
    chain's product; the variant's name in every table."""
    return f"t{int(trial_id.rpartition('_')[2] or 0):02d}_{product_name(expand(chain), '_')}"


def finished_trial(ctx: SearchContext, trial_id: str) -> dict | None:
    """The final report of this trial from an earlier, killed ``optforge tune`` of the same search, or None.

    Ray Tune saves its search state every few seconds, so a kill can lose that a trial finished; MLflow
    has it. Resuming reports the recorded trial again instead of building and timing it twice.
    """
    experiment = mlflow.get_experiment_by_name(ctx.experiment)
    runs = mlflow.MlflowClient().search_runs(
        [experiment.experiment_id], f"tags.`optforge.tune.search` = '{ctx.search}' and "
        f"tags.`optforge.tune.trial_id` = '{trial_id}' and attributes.status = 'FINISHED'", max_results=1)
    if not runs or "accuracy" not in runs[0].data.metrics:
        return None
    run = runs[0]
    variant = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/{VARIANT_FILE}")
    return {**run.data.metrics, "benchmarked": 1, "mlflow_run_id": run.info.run_id, "variant": json.dumps(variant)}


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
def tune_trial(ctx: SearchContext, chain: list[str], values: dict) -> dict:
    """Build the trial's chain, benchmark it, log it; return its final metrics for Ray Tune."""
    trial_id = tune.get_context().get_trial_id() or "0"
    name = trial_name(trial_id, chain)
    overrides = [*trial_overrides(values), f"compress.chains={json.dumps([list(chain)])}"]
    configure(ctx.experiment)
    if (earlier := finished_trial(ctx, trial_id)) is not None:
        return earlier
    tags = {"optforge.variant": name, "optforge.chain": ">".join(chain), "optforge.tune.search": ctx.search,
            "optforge.tune.trial_id": trial_id, **process_tags()}
    with child_run(ctx.parent_run_id, TUNE_TRIAL_STAGE, run_name=name, tags=tags,
                   params={"chain": ">".join(chain), **values}) as run:
        run_id = run.info.run_id
        cfg = validate(apply_overrides(ctx.base, overrides))  # a bad combination fails this trial, named
        teacher, data = ModelRef(**ctx.teacher), DataRef(**ctx.data)
        stage = StageRunner(force=False, parent_run_id=run_id)
        onnx_steps = OnnxSteps(cfg.export, cfg.fuse, cfg.quantize, cfg.engines.static_int8)
        with epoch_listener(_report_epochs(run_id)):
            (variant,) = chain_variants(cfg.compress, teacher, data, ctx.workdir, _Building(stage, ctx.lock_dir),
                                        onnx_steps)
        variant = replace(variant, name=name)
        with timing(ctx.lock_dir):
            (result,) = stage(benchmark, cfg=cfg.benchmark, variants=[variant], data=data)
        bad = [k for k, v in result.metrics.items() if not math.isfinite(v) and k != "flops"]
        if bad:
            raise ValueError(f"trial {name}: the benchmark measured non-finite {', '.join(bad)} (a model that "
                             "diverged, or one that could not run)")
        mlflow.log_metrics(result.metrics)
        mlflow.log_dict(asdict(variant), VARIANT_FILE)
        mlflow.set_tags({"optforge.format": str(variant.format),
                         **{f"optforge.{k}": str(v) for k, v in variant.info.get("lineage", {}).items()}})
    return {**result.metrics, "benchmarked": 1, "mlflow_run_id": run_id, "variant": json.dumps(asdict(variant), default=str)}


def run_trial(config: dict, ctx: SearchContext) -> None:
    """Ray Tune's trainable: one trial, reported to Tune; an error fails the trial (recorded), not the search."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    os.environ["MLFLOW_TRACKING_URI"] = ctx.tracking_uri  # Ray starts a trial in its own folder
    updates = {PREFECT_API_URL: ctx.prefect_api_url} if ctx.prefect_api_url else {}
    with temporary_settings(updates=updates):
        final = tune_trial(ctx, config["trial"]["chain"], config["trial"]["values"])
    tune.report(final)
