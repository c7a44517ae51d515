"""``optforge bench``: the default pipeline's variants timed side by side in one process, as ratios.

The variants come from the optimize flow's own (cached) stages, so after ``optforge run`` nothing is
rebuilt; only the timing runs again, interleaved across variants (tasks/techniques/measurement/harness.py). The
report goes to stdout, to a JSON file (commit, code version, machine, settings) that a later run
can ``--compare`` against, and to an MLflow run tagged ``optforge.pipeline=bench``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import os
import re
import sys
import tempfile
from pathlib import Path

EXIT_CONFIG, EXIT_FAILED, EXIT_MISSED = 2, 1, 3
ROOT = Path(__file__).resolve().parents[1]


def git_commit(root: Path = ROOT) -> str:
    """HEAD's commit read from ``.git`` (no git process), or "unknown" outside a checkout."""
    git = root / ".git"
    try:
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head
        ref = head[5:]
        if (git / ref).is_file():
            return (git / ref).read_text().strip()
        packed = (git / "packed-refs").read_text().splitlines() if (git / "packed-refs").is_file() else []
        return next((line.split()[0] for line in packed if line.endswith(" " + ref)), "unknown")
    except OSError:
        return "unknown"


def measure_variants(variants, data, cfg, harness) -> dict:
    """Load every buildable variant, time them all side by side; the report without run identifiers."""
    from optforge.tasks.stages.benchmark import FAILED, SKIPPED, load_variant
    from optforge.tasks.techniques.data.data import load_splits
    from optforge.tasks.techniques.measurement.harness import machine_info, measure_side_by_side, ratios, verdicts

    splits = load_splits(data.path)
    loaded, skipped, failed = {}, {}, {}
    with tempfile.TemporaryDirectory() as scratch:
        for ref in variants:
            if ref.format == SKIPPED:
                skipped[ref.name] = ref.info.get("skip_reason", "unknown")
            elif ref.format == FAILED:
                failed[ref.name] = f"{ref.info['failed_step']}: {ref.info['error']}"
            else:
                loaded[ref.name] = (ref, load_variant(ref, cfg.benchmark, Path(scratch)))
    timings = measure_side_by_side({n: v.predict for n, (_, v) in loaded.items()}, splits.test, harness)
    table = {n: {**timings[n], "size_mb": v.size_mb, "params": float(v.params), "format": ref.format, "runtime": v.settings}
             for n, (ref, v) in loaded.items()}
    rows = ratios(timings, harness.best_within)
    return {"schema": 1, "machine": machine_info(),
            "settings": {"threads": cfg.benchmark.threads, "graph_optimization": cfg.benchmark.graph_optimization,
                         **harness.to_dict()},
            "variants": table, "skipped": skipped, "failed": failed, "ratios": rows, "targets": verdicts(rows)}


def _metric_key(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_").lower()


def _log_report(report: dict, text: str) -> None:
    import mlflow

    from optforge.tasks.runtime.tracking import flatten

    mlflow.log_params(flatten({"settings": report["settings"], "machine": report["machine"]}))
    metrics = {f"{n}.{k}": v for n, m in report["variants"].items() for k, v in m.items() if isinstance(v, float)}
    metrics |= {f"ratio.{_metric_key(r['comparison'])}.{k}": r[k] for r in report["ratios"]
                for k in ("speedup_p50_b1", "speedup_p99_b1", "throughput_ratio_b64", "accuracy_delta")}
    mlflow.log_metrics(metrics)
    mlflow.set_tags({"optforge.commit": report["commit"], "optforge.code_version": report["code_version"],
                     **{f"optforge.target.{_metric_key(t['comparison'])}": "met" if t["met"] else "missed"
                        for t in report["targets"]},
                     **{f"optforge.skipped.{n}": why[:5000] for n, why in report["skipped"].items()}})
    mlflow.log_dict(report, "bench.json")
    mlflow.log_text(text, "bench.txt")


def bench(config_path: str | None = None, overrides: list[str] | None = None, force: bool = False,
          harness: dict | None = None) -> dict:
    """Build (or reuse) the variants, time them side by side, log the report to MLflow and return it."""
    return _bench_flow()(config_path, overrides, force, harness or {})


@functools.cache
def _bench_flow():
    """The Prefect flow, built on first use: ``optforge --help`` imports this module and must stay instant."""
    from prefect import flow

    @flow(name="bench")
    def bench_flow(config_path, overrides, force: bool, harness: dict) -> dict:
        import mlflow

        from optforge.flows.optimize import StageRunner, build_variants
        from optforge.flows.params import load_config, peek_tracking
        from optforge.tasks.runtime.caching import code_version
        from optforge.tasks.runtime.tracking import configure, error_tags, process_tags
        from optforge.tasks.techniques.measurement.harness import HarnessConfig, format_report

        configure(peek_tracking(config_path, overrides).experiment)
        cfg = load_config(config_path, overrides)
        harness_cfg = HarnessConfig.from_dict(harness)
        tags = {"optforge.pipeline": "bench", "optforge.config_path": str(config_path or "<defaults>"), **process_tags()}
        with mlflow.start_run(run_name="bench", tags=tags) as run:
            try:
                data, variants, _ = build_variants(cfg, str(Path(cfg.tracking.workdir).resolve()), StageRunner(force, run.info.run_id))
                report = measure_variants(variants, data, cfg, harness_cfg)
                report |= {"created_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "commit": git_commit(),
                           "code_version": code_version(), "mlflow_run_id": run.info.run_id, "workdir": cfg.tracking.workdir}
                _log_report(report, format_report(report))
            except BaseException as exc:
                mlflow.set_tags(error_tags(exc))
                raise
        return report

    return bench_flow


def _write_json(report: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".json")
    with os.fdopen(fd, "w") as fh:
        json.dump(report, fh, indent=2)
    os.replace(tmp, path)
    return path


def cmd_bench(args: argparse.Namespace) -> int:
    """``optforge bench``: print the table, write the JSON, log to MLflow; exit 3 on a missed target with --strict."""
    from optforge.flows.environment import embedded_defaults, quiet_libraries

    embedded_defaults()
    quiet_libraries()
    from pydantic import ValidationError

    from optforge.flows.params import ConfigError
    from optforge.tasks.techniques.measurement.harness import HarnessConfig, format_report

    previous = None
    if args.compare:
        try:
            previous = json.loads(Path(args.compare).read_text())
        except (OSError, ValueError) as exc:
            print(f"error: --compare {args.compare}: cannot read a bench JSON ({exc})", file=sys.stderr)
            return EXIT_CONFIG
    overrides = list(args.set) + ([f"benchmark.threads={args.threads}"] if args.threads is not None else [])
    harness = {k: v for k, v in {"iters_b1": args.iters_b1, "iters_batch": args.iters_batch, "rounds": args.rounds}.items()
               if v is not None}
    try:
        HarnessConfig.from_dict(harness)
    except ValidationError as exc:
        bad = "; ".join(f"--{'-'.join(map(str, e['loc'])).replace('_', '-')}: {e['msg']} (got {e['input']!r})" for e in exc.errors())
        print(f"error: {bad}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        report = bench(args.config, overrides, args.force, harness)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except Exception as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    stamp = report["created_utc"].replace(":", "").replace("-", "")
    out = Path(args.out) if args.out else Path(report["workdir"]) / "bench" / f"bench-{report['commit'][:8]}-{stamp}.json"
    _write_json(report, out)
    print("\n" + format_report(report, previous))
    print(f"\nJSON: {out}\nMLflow run: {report['mlflow_run_id']}")
    return EXIT_MISSED if args.strict and not all(t["met"] for t in report["targets"]) else 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``bench`` to ``optforge``'s subcommands."""
    p = subparsers.add_parser("bench", help="time the pipeline's variants side by side and print ratios")
    p.add_argument("--config", help="YAML config, as for 'run' (the variants are built from it, or reused)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, as for 'run'")
    p.add_argument("--force", action="store_true", help="rebuild the variants instead of reusing cached stages")
    p.add_argument("--threads", type=int, help="intra-op threads for every variant (default: benchmark.threads)")
    p.add_argument("--iters-b1", type=int, help="timed batch-1 calls per variant (default 500)")
    p.add_argument("--iters-batch", type=int, help="timed batch-64 calls per variant (default 60)")
    p.add_argument("--rounds", type=int, help="interleaved timing rounds (default 5)")
    p.add_argument("--out", help="JSON report path (default: <workdir>/bench/bench-<commit>-<time>.json)")
    p.add_argument("--compare", metavar="JSON", help="an earlier report: show its ratios next to this run's")
    p.add_argument("--strict", action="store_true", help=f"exit {EXIT_MISSED} when a target is missed")
    p.set_defaults(func=cmd_bench)
    return p
