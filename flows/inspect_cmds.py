"""``optforge report RUN_ID`` and ``optforge compare``: look at past runs from MLflow alone.

``flows.cli`` hooks these in with ``add_parsers(subparsers)``. Heavy imports (MLflow, matplotlib,
Prefect) happen inside the commands, so ``optforge --help`` stays instant.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

EXIT_FAILED = 1
# (metric, header, format) of ``compare``'s columns, the same names as the MLflow UI's compare page.
COMPARE_COLUMNS = (
    ("accuracy", "acc %", "{:.2f}"),
    ("latency_ms_p50_b1", "p50 ms", "{:.4g}"),  # 4 significant digits: microseconds to seconds
    ("latency_ms_p95_b1", "p95 ms", "{:.4g}"),
    ("throughput_sps_b64", "thr b64/s", "{:,.0f}"),
    ("size_mb", "size MB", "{:.4g}"),
    ("params", "params", "{:,.0f}"),
)


def add_parsers(subparsers) -> None:
    """Add the ``report`` and ``compare`` subcommands to ``optforge``'s subparsers."""
    rep = subparsers.add_parser(
        "report", help="rebuild a pipeline run's report (markdown, HTML, Pareto plot) from MLflow"
    )
    rep.add_argument("run_id", help="the pipeline (parent) run's MLflow run id, as printed by `optforge run`/`runs`")
    rep.add_argument("--out", help="output folder (default: .optforge/reports/RUN_ID)")
    rep.set_defaults(func=cmd_report)
    cmp = subparsers.add_parser("compare", help="table of recent pipeline runs and their variants, from MLflow")
    cmp.add_argument("--experiment", default="optforge", help="MLflow experiment (default: optforge)")
    cmp.add_argument("--last", type=_positive_int, default=5, help="how many recent pipeline runs (default: 5)")
    cmp.set_defaults(func=cmd_compare)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _client():
    import mlflow

    from optforge.tasks.runtime.tracking import tracking_uri

    mlflow.set_tracking_uri(tracking_uri())
    return mlflow.MlflowClient()


def cmd_report(args: argparse.Namespace) -> int:
    client = _client()
    from optforge.tasks.stages.report import ReportError, load_report_data
    from optforge.tasks.techniques.measurement.report import headline, write_report

    try:
        data = load_report_data(client, args.run_id)
    except ReportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    files = write_report(data, Path(args.out or Path(".optforge") / "reports" / args.run_id))
    print(headline(data))
    for label, path in (("markdown", files.markdown), ("html", files.html), ("plot", files.plot)):
        print(f"{label:9} {path}")
    return 0


def _fmt(value, fmt: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else fmt.format(value)


def compare_rows(client, experiment_id: str, last: int) -> tuple[list[list[str]], set[str]]:
    """One row per (pipeline run, variant), newest run first (run columns on its first row); registered model names."""
    import mlflow

    from optforge.tasks.stages.report import benchmark_runs, register_run

    runs = client.search_runs(
        [experiment_id],
        filter_string="tags.`optforge.pipeline` = 'optimize'",
        order_by=["attributes.start_time DESC"],
        max_results=last,
    )
    rows, models = [], set()
    for run in runs:
        started = mlflow.utils.time.conv_longdate_to_str(run.info.start_time)[:16] if run.info.start_time else "-"
        head = [run.info.run_id[:12], started, run.info.status]
        reg = register_run(client, run)
        reg_tags = reg.data.tags if reg else {}
        if "optforge.registered_model" in reg_tags:
            models.add(reg_tags["optforge.registered_model"])
        registered = run.data.tags.get("optforge.registered", "none" if reg else "-")
        mark = f"v{reg_tags.get('optforge.registered_version', '?')} {reg_tags.get('optforge.alias', '')}".strip()
        bench = benchmark_runs(client, run)
        if not bench:
            rows.append(head + ["(no variants)"] + [""] * (len(COMPARE_COLUMNS) + 2))
            continue
        params = {**run.data.params, **(reg.data.params if reg else {})}  # the register run logs its own config
        baseline = params.get("register.baseline", "pytorch_fp32")
        metrics = {r.data.tags.get("optforge.variant", r.info.run_name): r.data.metrics for r in bench}
        base_lat = metrics.get(baseline, {}).get("latency_ms_p50_b1")
        for i, (name, m) in enumerate(metrics.items()):
            lat = m.get("latency_ms_p50_b1")
            speedup = base_lat / lat if base_lat and lat else None
            cells = [_fmt(m.get(k), f) for k, _, f in COMPARE_COLUMNS] + [_fmt(speedup, "{:.2f}x")]
            rows.append((head if i == 0 else ["", "", ""]) + [name] + cells + [mark if name == registered else ""])
        if registered in ("none", "-"):
            rows[-len(metrics)][-1] = "(none)" if reg else "(no register stage)"
    return rows, models


def current_aliases(client, rows_models: set[str]) -> list[str]:
    """Where each model's aliases point now (they may have moved since the runs above)."""
    from mlflow.exceptions import MlflowException

    lines = []
    for name in sorted(rows_models):
        try:
            aliases = client.get_registered_model(name).aliases
        except MlflowException:
            continue
        lines.append(f"{name} now: " + (", ".join(f"{a} v{v}" for a, v in sorted(aliases.items())) or "no aliases"))
    return lines


def cmd_compare(args: argparse.Namespace) -> int:
    client = _client()
    from optforge.tasks.runtime.tracking import tracking_uri

    experiment = client.get_experiment_by_name(args.experiment)
    if experiment is None:
        print(f"error: no MLflow experiment named '{args.experiment}' at {tracking_uri()}", file=sys.stderr)
        return EXIT_FAILED
    rows, models = compare_rows(client, experiment.experiment_id, args.last)
    if not rows:
        print(f"no pipeline runs in experiment '{args.experiment}'")
        return 0
    header = [
        "run",
        "started (UTC)",
        "status",
        "variant",
        *(h for _, h, _ in COMPARE_COLUMNS),
        "speed-up",
        "registered",
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    left = {0, 1, 2, 3, len(header) - 1}  # text columns; numbers align right

    def line(cells):
        return "  ".join(
            c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
        ).rstrip()

    print(
        "\n".join(
            [line(header), line(["-" * w for w in widths]), *map(line, rows), "", *current_aliases(client, models)]
        )
    )
    return 0
