"""``optforge`` command line: ``run`` the optimize flow, ``tune`` (the search), list recent ``runs``; ``report``
and ``compare`` (inspect_cmds.py), ``bench`` (bench.py), ``serve`` (serve_cmd.py), ``examples`` (examples.py).

Imports of Prefect, MLflow and torch happen inside the commands, after the embedded defaults are
put in the environment, so ``optforge --help`` is instant and nothing is configured at import.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from optforge.flows.environment import embedded_defaults, quiet_libraries

EXIT_CONFIG, EXIT_FAILED = 2, 1
NAN = float("nan")


def _fmt(v: float, digits: int = 2) -> str:
    return "-" if v != v else f"{v:,.{digits}f}"  # NaN: a skipped variant (e.g. TensorRT without CUDA)


def _table(header: tuple, rows: list[tuple], numbers_right: bool = False) -> list[str]:
    """Aligned text lines: the header, a rule, the rows (all but the first column right-aligned if asked)."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(r) -> str:
        return "  ".join(str(c).rjust(w) if i and numbers_right else str(c).ljust(w)
                         for i, (c, w) in enumerate(zip(r, widths)))

    return [line(header), line(["-" * w for w in widths]), *map(line, rows)]


def _registration_line(reg: dict) -> str:
    alias = f" as '{reg['alias']}'" if reg.get("alias") else ""
    return (f"registered {reg['model_name']} version {reg['version']}{alias} ({reg['reason']})"
            if reg["version"] else f"nothing registered: {reg['reason']}")


def format_summary(summary: dict) -> str:
    """The run's variants as an aligned text table, plus the registration outcome."""
    header = ("variant", "accuracy %", "p50 b1 ms", "p95 b1 ms", "thr b64 /s", "size MB", "params", "speed-up b1")
    rows = [
        (
            v["variant"], _fmt(v["accuracy"]), _fmt(v["latency_ms_p50_b1"], 3), _fmt(v["latency_ms_p95_b1"], 3),
            _fmt(v["throughput_sps_b64"], 0), _fmt(v["size_mb"], 3), f"{int(v['params']):,}" if v["params"] == v["params"] else "-",
            "-" if v["speedup_b1"] != v["speedup_b1"] else f"{v['speedup_b1']:.2f}x",
        )
        for v in summary["variants"]
    ]
    table = _table(header, rows, numbers_right=True)
    outcome = _registration_line(summary["registration"])
    stages = ", ".join(f"{s['stage']} " + ("cached" if s["cached"] else f"{s['seconds']}s") for s in summary["stages"])
    skipped = [f"{v['variant']}: skipped ({v['skipped']})" for v in summary["variants"] if v.get("skipped")]
    skipped += [f"{name}: skipped ({why})" for name, why in summary.get("skipped", {}).items()]
    failed = summary.get("failed", {})
    lines = [*table, *skipped, *(f"{name}: failed ({why})" for name, why in failed.items()), "", outcome,
             f"stages: {stages}", f"MLflow parent run: {summary['parent_run_id']}",
             *([f"report: {summary['report']}"] if summary.get("report") else [])]
    if failed:  # the last line counts them; each one's traceback is an artifact of the parent run
        lines.append(f"{len(failed)} variant(s) failed: {', '.join(failed)} (tracebacks: the parent run's "
                     "failures/ artifacts); the others were benchmarked")
    return "\n".join(lines)


def _run_flow(args: argparse.Namespace, call, render) -> int:
    """Check the environment, run a flow, print ``render(summary)``; errors become exit codes and one line."""
    embedded_defaults()
    quiet_libraries(args.verbose)
    from optforge.flows.preflight import PreflightError, check_environment

    try:  # an unreachable server fails here in seconds, naming its variable, instead of hanging in retries
        check_environment()
    except PreflightError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    from optforge.flows.params import ConfigError, peek_tracking

    try:
        summary = call()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except Exception as exc:  # the flow already marked its MLflow run FAILED with this error as a tag
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        workdir = Path(peek_tracking(args.config, args.set).workdir).resolve()
        if workdir.exists():
            print(f"outputs of the stages that finished are kept under {workdir}; re-running the same "
                  "command reuses them", file=sys.stderr)
        return EXIT_FAILED
    print("\n" + render(summary))
    if getattr(args, "strict", False) and summary.get("failed"):
        print(f"error: --strict: {len(summary['failed'])} variant(s) failed", file=sys.stderr)
        return EXIT_FAILED
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    def call():
        from optforge.flows.optimize import optimize

        return optimize(config_path=args.config, overrides=args.set, force=args.force)

    return _run_flow(args, call, format_summary)


def format_tune(summary: dict) -> str:
    """The search's trials (front marked), then the registration."""
    header = ("trial", "status", "accuracy %", "p50 b1 ms", "size MB", "front", "settings / why")
    rows = []
    for t in summary["trials"]:
        m = t.get("metrics", {})
        why = t.get("reason") or t.get("error") or " ".join(f"{k.rpartition('.')[2]}={v}" for k, v in t["values"].items())
        rows.append((t["trial"], t["status"], _fmt(m.get("accuracy", NAN)),
                     _fmt(m.get("latency_ms_p50_b1", NAN), 3), _fmt(m.get("size_mb", NAN), 3),
                     "*" if t["trial"] in summary["front"] else "", why[:120]))
    base = summary["baseline"]
    rows.append((f"{base['name']} (teacher)", "baseline", _fmt(base["accuracy"]), _fmt(base["latency_ms_p50_b1"], 3),
                 _fmt(base["size_mb"], 3), "*" if base["name"] in summary["front"] else "", ""))
    return "\n".join([*_table(header, rows), "",
                      f"accuracy floor {summary['floor']:.2f}%; Pareto front: {', '.join(summary['front'])}",
                      _registration_line(summary["registration"]),
                      (f"{'resumed' if summary['resumed'] else 'searched'} in {summary['seconds']} s "
                       f"({summary['search']})"), f"MLflow tune run: {summary['parent_run_id']}",
                      f"report: {summary['report']}"])


def cmd_tune(args: argparse.Namespace) -> int:
    def call():
        from optforge.flows.tune import tune

        return tune(config_path=args.config, overrides=args.set, force=args.force)

    return _run_flow(args, call, format_tune)


def cmd_runs(args: argparse.Namespace) -> int:
    import mlflow

    from optforge.tasks.runtime.tracking import pipeline_runs, tracking_uri

    mlflow.set_tracking_uri(tracking_uri())
    experiment = mlflow.get_experiment_by_name(args.experiment)
    if experiment is None:
        print(f"error: no MLflow experiment named '{args.experiment}' at {tracking_uri()}", file=sys.stderr)
        return EXIT_FAILED
    runs = pipeline_runs(mlflow.MlflowClient(), experiment.experiment_id, max_results=args.last)[: args.last]
    print(f"{'run id':32}  {'started (UTC)':19}  {'kind':8}  {'status':8}  {'registered':18}  error")
    for run in runs:
        tags = run.data.tags
        started = mlflow.utils.time.conv_longdate_to_str(run.info.start_time) if run.info.start_time else "-"
        print(f"{run.info.run_id:32}  {started[:19]:19}  {tags['optforge.pipeline']:8}  {run.info.status:8}  "
              f"{tags.get('optforge.registered', '-'):18}  {tags.get('optforge.error', '')[:80]}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="optforge", description="Optimize a PyTorch model as a tracked Prefect flow.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the optimize flow")
    run.add_argument("--config", help="YAML config (default: the built-in defaults, as in configs/default.yaml)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. train.epochs=3")
    run.add_argument("--force", action="store_true", help="re-run every stage instead of reusing cached ones")
    run.add_argument("--strict", action="store_true",
                     help="exit non-zero when any chain or engine failed (by default it is reported and the rest go on)")
    run.add_argument("--verbose", action="store_true",
                     help="also show library warnings, ONNX Runtime's log and the Ray workers' own output")
    run.set_defaults(func=cmd_run)
    tune = sub.add_parser("tune", help="search compression chains and settings with Ray Tune (the config's tune: "
                          "section); register the best trial")
    tune.add_argument("--config", help="YAML config (default: the built-in defaults)")
    tune.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override, e.g. tune.trials=16 or tune.time_budget_s=1800")
    tune.add_argument("--force", action="store_true", help="start the search over instead of resuming it")
    tune.add_argument("--verbose", action="store_true", help="show the libraries' own log lines")
    tune.set_defaults(func=cmd_tune)
    runs = sub.add_parser("runs", help="list recent pipeline runs from MLflow")
    runs.add_argument("--experiment", default="optforge")
    runs.add_argument("--last", type=int, default=10)
    runs.set_defaults(func=cmd_runs)
    from optforge.flows.bench import add_parser as add_bench_parser
    from optforge.flows.examples import add_parser as add_examples_parser
    from optforge.flows.inspect_cmds import add_parsers
    from optforge.flows.serve_cmd import add_parser as add_serve_parser

    add_parsers(sub)  # report RUN_ID, compare
    add_bench_parser(sub)
    add_serve_parser(sub)  # serve: the flow on a schedule from this machine
    add_examples_parser(sub)  # examples: data and small models for configs/examples/
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
