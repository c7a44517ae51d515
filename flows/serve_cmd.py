"""``optforge serve``: run the optimize flow on a schedule from this one machine (``flow.serve``).

The process registers a deployment with the Prefect server named by ``PREFECT_API_URL``, then waits
for its scheduled runs and for runs triggered by hand (``prefect deployment run optimize/<name>``),
and executes each in a subprocess with this process's environment. No work pool or worker is
needed; stop it with Ctrl-C (its schedule is paused on the way out). For several machines, use a
work pool and ``deployments/prefect.yaml`` instead.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

DEFAULT_NAME = "optforge-serve"
DEFAULT_CRON = "0 2 * * *"  # 02:00 every day, in --timezone
EXIT_FAILED = 1


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``serve`` to ``optforge``'s sub-commands (called from ``flows.cli.build_parser``)."""
    serve = sub.add_parser("serve", help="serve the optimize flow on a schedule from this machine (flow.serve)",
                           description="Register the optimize flow with the Prefect server at PREFECT_API_URL and "
                           "run its scheduled and hand-triggered runs (prefect deployment run optimize/NAME) here, "
                           "until stopped with Ctrl-C.")
    serve.add_argument("--name", default=DEFAULT_NAME, help=f"deployment name (default: {DEFAULT_NAME})")
    serve.add_argument("--cron", default=DEFAULT_CRON, help=f"schedule, cron syntax (default: '{DEFAULT_CRON}')")
    serve.add_argument("--timezone", default="UTC", help="time zone of --cron, e.g. Europe/Berlin (default: UTC)")
    serve.add_argument("--no-schedule", action="store_true", help="serve without a schedule (runs by hand only)")
    serve.add_argument("--config", help="YAML config each run uses (default: the built-in defaults)")
    serve.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. train.epochs=3")
    serve.add_argument("--force", action="store_true", help="each run re-runs every stage instead of using the cache")
    serve.add_argument("--limit", type=int, default=1, help="at most this many runs at once (default: 1)")
    serve.set_defaults(func=cmd_serve)
    return serve


def serve_kwargs(args: argparse.Namespace) -> dict:
    """Arguments for ``optimize.serve``; the config path is made absolute (runs start in their own process)."""
    from prefect.schedules import Cron

    params = {"config_path": str(Path(args.config).resolve()) if args.config else None,
              "overrides": list(args.set), "force": bool(args.force)}
    return {
        "name": args.name,
        "schedules": [] if args.no_schedule else [Cron(args.cron, timezone=args.timezone)],
        "parameters": params,
        "limit": args.limit,
        "tags": ["optforge"],
        "description": "optforge optimize flow, served by `optforge serve`",
    }


def cmd_serve(args: argparse.Namespace) -> int:
    """Check the servers, validate the config, then serve until interrupted."""
    from optforge.flows.environment import embedded_defaults
    from optforge.flows.preflight import PreflightError, check_environment

    embedded_defaults()
    if not os.environ.get("PREFECT_API_URL"):
        print("error: PREFECT_API_URL is not set: `optforge serve` registers a schedule with a Prefect server; "
              "start one (`prefect server start`) and set PREFECT_API_URL=http://HOST:4200/api", file=sys.stderr)
        return EXIT_FAILED
    try:
        check_environment()
    except PreflightError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    from optforge.flows.params import ConfigError, load_config

    try:  # a bad config should stop `serve` now, not fail every scheduled run at 2 a.m.
        load_config(args.config, args.set)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from optforge.flows.optimize import optimize

    optimize.serve(**serve_kwargs(args))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m optforge.flows.serve_cmd`` / ``deployments/serve.py``: the same as ``optforge serve``."""
    parser = argparse.ArgumentParser(prog="optforge")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
