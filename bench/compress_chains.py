"""Benchmark the compression chains against the FP32 PyTorch teacher (a script, not a timed test).

Runs the optimize flow once (default dataset and config unless told otherwise; cached stages are
reused, ``--force`` re-runs them), then prints, for every chain's variant: accuracy, batch-1 latency
p50, batch-64 throughput, size, FLOPs, and the ratios against the teacher, with the issue's target:
at least 4x faster at batch 1 and 8x smaller, losing at most 1 accuracy point.

    .venv/bin/python bench/compress_chains.py [--config FILE] [--set KEY=VALUE ...] [--force] [--json OUT]

The numbers come from the benchmark stage (``benchmark.*`` settings: 1 thread, 200 timed batch-1 calls),
so they are the same ones MLflow holds for the run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TEACHER = "pytorch_fp32"
TARGET = {"speedup_b1": 4.0, "smaller": 8.0, "max_drop": 1.0}


def chain_rows(summary: dict, chains) -> list[dict]:
    """One row per chain variant (plus the teacher), with ratios against the teacher. Chains the run's plan
    skipped (they cannot apply to this model or data: ``summary["skipped"]``) have no variant and no row."""
    from optforge.flows.chain_config import expand, product_name

    by_name = {v["variant"]: v for v in summary["variants"]}
    if TEACHER not in by_name:
        raise SystemExit(f"no {TEACHER} variant to compare with (skipped: {summary.get('skipped', {})})")
    base = by_name[TEACHER]
    rows = []
    for chain in [None, *chains]:
        name = TEACHER if chain is None else product_name(expand(chain), "_")
        if name not in by_name:
            continue
        v = by_name[name]
        row = {
            "variant": name, "chain": "teacher (FP32 PyTorch)" if chain is None else ">".join(chain),
            "accuracy": v["accuracy"], "p50_b1_ms": v["latency_ms_p50_b1"], "thr_b64": v["throughput_sps_b64"],
            "size_mb": v["size_mb"], "params": v["params"], "flops": v.get("flops", float("nan")),
            "speedup_b1": base["latency_ms_p50_b1"] / v["latency_ms_p50_b1"], "smaller": base["size_mb"] / v["size_mb"],
            "drop": base["accuracy"] - v["accuracy"],
        }
        row["meets_target"] = (row["speedup_b1"] >= TARGET["speedup_b1"] and row["smaller"] >= TARGET["smaller"]
                               and row["drop"] <= TARGET["max_drop"])
        rows.append(row)
    return rows


def render(rows: list[dict]) -> str:
    header = ("chain", "variant", "acc %", "drop pt", "p50 b1 ms", "speed-up", "thr b64/s", "size MB", "smaller",
              "MFLOPs", "target")
    body = [(r["chain"], r["variant"], f"{r['accuracy']:.2f}", f"{r['drop']:+.2f}", f"{r['p50_b1_ms']:.4f}",
             f"{r['speedup_b1']:.1f}x", f"{r['thr_b64']:,.0f}", f"{r['size_mb']:.3f}", f"{r['smaller']:.1f}x",
             f"{r['flops'] / 1e6:.3f}", "-" if r["variant"] == TEACHER else ("yes" if r["meets_target"] else "no"))
            for r in rows]
    widths = [max(len(str(x[i])) for x in [header, *body]) for i in range(len(header))]

    def fmt(cells) -> str:
        return "  ".join(str(c).ljust(w) if i < 2 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *map(fmt, body)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML config (default: the built-in defaults)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. compress.prune.sparsity=0.8")
    parser.add_argument("--force", action="store_true", help="re-run every stage instead of reusing cached ones")
    parser.add_argument("--json", help="also write the rows as JSON to this file")
    args = parser.parse_args(argv)

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    from optforge.flows.optimize import optimize
    from optforge.flows.params import load_config

    cfg = load_config(args.config, args.set)
    summary = optimize(config_path=args.config, overrides=args.set, force=args.force)
    rows = chain_rows(summary, cfg.compress.chains)
    for name, why in summary.get("skipped", {}).items():
        print(f"skipped {name}: {why}")
    best = max((r for r in rows[1:] if r["drop"] <= TARGET["max_drop"]), key=lambda r: r["speedup_b1"], default=None)
    print("\n" + render(rows))
    if best is None:
        print("\ntarget not met: no chain stays within 1 accuracy point of the teacher")
    else:
        verdict = "met" if best["meets_target"] else "NOT met"
        print(f"\nbest chain within {TARGET['max_drop']} point: {best['chain']} ({best['variant']}): "
              f"{best['speedup_b1']:.1f}x faster at batch 1, {best['smaller']:.1f}x smaller, "
              f"{best['drop']:+.2f} points -> target (>= 4x, >= 8x, <= 1 point) {verdict}")
    print("stages: " + ", ".join(f"{s['stage']} {'cached' if s['cached'] else str(s['seconds']) + 's'}"
                                 for s in summary["stages"]))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "stages": summary["stages"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
