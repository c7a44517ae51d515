"""The searched front against the default chains, at the same time budget (a script, not a timed test).

1. ``optforge run`` with the config (its chains: the default ones unless the config says otherwise); its
   wall time less the data and teacher stages (which the search reuses from the cache) is the budget;
2. ``optforge tune`` with the same config and ``tune.time_budget_s`` set to that budget;
3. both sets of variants, each one's Pareto front over (accuracy, latency p50 at batch 1, size), and for
   each variant of the run's front: the fastest trial at least as accurate, and the most accurate trial at
   least as fast.

    .venv/bin/python bench/tune_vs_run.py [--config FILE] [--set KEY=VALUE ...] [--trials N] [--json OUT]

Run it in an empty folder or with its own ``tracking.workdir``: it reads the two runs back from MLflow.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LATENCY = "latency_ms_p50_b1"
SHARED_STAGES = ("prepare_data", "train")  # built by the run, taken from the cache by the search


def _cli(args: list[str]) -> float:
    """Run ``optforge ARGS``; its wall time in seconds (a failure stops the bench with the command's output)."""
    exe = str(Path(sys.executable).with_name("optforge"))
    start = time.perf_counter()
    done = subprocess.run([exe, *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"optforge {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def _latest(client, experiment: str, pipeline: str):
    exp = client.get_experiment_by_name(experiment)
    (run,) = client.search_runs([exp.experiment_id], f"tags.`optforge.pipeline` = '{pipeline}'",
                                order_by=["attributes.start_time DESC"], max_results=1)
    return run


def _points(client, run) -> dict[str, dict[str, float]]:
    from optforge.tasks.stages.report import benchmark_runs

    points = {}
    for r in benchmark_runs(client, run):
        m = r.data.metrics
        if all(math.isfinite(m.get(k, math.nan)) for k in ("accuracy", LATENCY, "size_mb")):
            points[r.data.tags.get("optforge.variant", r.info.run_name)] = m
    return points


def compare(run_points: dict, tune_points: dict) -> list[dict]:
    """For each variant on the run's front: the fastest trial at least as accurate, the most accurate at least as fast."""
    from optforge.tasks.techniques.measurement.pareto import pareto_front

    rows = []
    trials = {k: v for k, v in tune_points.items() if k.startswith("t")}
    for name in pareto_front(run_points, LATENCY):
        m = run_points[name]
        as_accurate = [t for t, v in trials.items() if v["accuracy"] >= m["accuracy"]]
        as_fast = [t for t, v in trials.items() if v[LATENCY] <= m[LATENCY]]
        faster = min(as_accurate, key=lambda t: trials[t][LATENCY], default=None)
        better = max(as_fast, key=lambda t: trials[t]["accuracy"], default=None)
        rows.append({"run_variant": name, "accuracy": m["accuracy"], LATENCY: m[LATENCY], "size_mb": m["size_mb"],
                     "fastest_trial_as_accurate": faster,
                     "its_latency": trials[faster][LATENCY] if faster else None,
                     "most_accurate_trial_as_fast": better,
                     "its_accuracy": trials[better]["accuracy"] if better else None})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config")
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--trials", type=int, default=64, help="more than the budget allows: the budget ends the search")
    parser.add_argument("--json")
    args = parser.parse_args()
    from mlflow import MlflowClient

    from optforge.flows.environment import embedded_defaults
    from optforge.flows.params import load_config
    from optforge.tasks.runtime.tracking import tracking_uri
    from optforge.tasks.techniques.measurement.pareto import pareto_front

    embedded_defaults()
    base = (["--config", args.config] if args.config else []) + [a for s in args.set for a in ("--set", s)]
    experiment = load_config(args.config, args.set).tracking.experiment
    run_wall = _cli(["run", *base])
    client = MlflowClient(tracking_uri())
    run = _latest(client, experiment, "optimize")
    shared = sum(run.data.metrics.get(f"stage_seconds_{s}", 0.0) for s in SHARED_STAGES)
    budget = max(60.0, run_wall - shared)
    tune_wall = _cli(["tune", *base, "--set", f"tune.time_budget_s={budget:.0f}", "--set", f"tune.trials={args.trials}"])
    search = _latest(client, experiment, "tune")
    run_points, tune_points = _points(client, run), _points(client, search)
    result = {
        "run_wall_s": round(run_wall, 1), "shared_stages_s": round(shared, 1), "budget_s": round(budget, 1),
        "tune_wall_s": round(tune_wall, 1), "trials": {k: int(v) for k, v in search.data.metrics.items()
                                                        if k.startswith("trials_")},
        "run_front": list(pareto_front(run_points, LATENCY)), "tune_front": list(pareto_front(tune_points, LATENCY)),
        "run": run_points, "tune": tune_points, "compare": compare(run_points, tune_points),
        "run_registered": run.data.tags.get("optforge.registered"),
        "tune_registered": search.data.tags.get("optforge.registered"),
    }
    text = json.dumps(result, indent=2, default=float)
    print(text)
    if args.json:
        Path(args.json).write_text(text)


if __name__ == "__main__":
    os.environ.setdefault("OPTFORGE_VERBOSE", "0")
    main()
