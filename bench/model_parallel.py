"""Memory and throughput of fully sharded data parallel (``train.strategy=fsdp``) against DDP (``ssgd``).

Trains one wide MLP on digits (64 features, 10 classes; default 64 -> 4 x 4,096 -> 10, 50.7 M parameters,
203 MB of fp32 weights) with 2 Ray Train workers through the real worker loop (``tasks.workers.training_driver``),
once per strategy, and prints what the workers themselves report after the last epoch:

- ``params/worker``: parameters a worker holds (a slice under fsdp);
- ``state MB/worker``: bytes of parameters + gradients + AdamW's two moments a worker holds during a step;
- ``peak RSS MB``: the workers' resident-set high-water marks (``ru_maxrss``), rank 0 / the other rank.
  Rank 0 also receives the whole model for each epoch's checkpoint (both strategies; fsdp saves the
  optimizer state as per-rank shards, DDP's rank 0 saves its own whole copy);
- ``samples/s``: training throughput of the last epoch, both workers together (checkpointing excluded).

On CPU with gloo, fsdp's price is time: per step it gathers every unit's weights (twice with resharding)
and scatters the gradients, and FSDP2 copies each gathered buffer in and out; with one thread per worker
those copies cost about as much as the matrix products at batch 32.

    .venv/bin/python bench/model_parallel.py [--width 4096] [--depth 4] [--epochs 2] [--batch-size 32]
        [--strategies ssgd,fsdp] [--unit-params 1000000] [--json OUT]

``fsdp_keep`` is fsdp with ``train.fsdp_reshard_after_forward=false`` (weights stay gathered from forward to
backward: one all-gather fewer per step).

Each run costs Ray Train's start-up (~25 s here) plus the epochs; the defaults take 3.5-4 minutes on
2 cores (add fsdp_keep: ~6). One torch thread per worker, as in training.

Measured 2026-11-30 (2 cores shared with other jobs, load 3-5: throughput varies +-20% between runs):
ssgd 50.7 M params/worker, 773 MB state, peak RSS 1,674/1,674 MB, 65-91 samples/s; fsdp 25.3 M, 386 MB,
1,275/1,081 MB, 23-31 samples/s; fsdp_keep 386 MB, 1,323/1,121 MB, 34-41 samples/s. At --batch-size 128:
ssgd 230, fsdp 63 samples/s.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def run_one(strategy: str, args, data_path: Path, spec, tmp: Path) -> dict:
    from optforge.tasks.techniques.training.training import TrainConfig
    from optforge.tasks.workers.training_driver import run_training
    from optforge.tasks.workers.worker_common import WorkerConfig

    keep = strategy == "fsdp_keep"  # fsdp with fsdp_reshard_after_forward=false
    cfg = TrainConfig(strategy="fsdp" if keep else strategy, epochs=args.epochs, batch_size=args.batch_size, lr=1e-4,
                      patience=0, num_workers=2, threads_per_worker=1, max_failures=0,
                      fsdp_unit_params=args.unit_params, fsdp_reshard_after_forward=not keep)
    t0 = time.perf_counter()
    summary = run_training(WorkerConfig(cfg.to_dict(), asdict(spec), str(data_path)), tmp / "ray", strategy,
                           tmp / f"out-{strategy}")
    m = summary["metrics"]
    return {"strategy": strategy, "params": int(m["model_params"]), "params_per_worker": int(m["worker_params_max"]),
            "state_mb_per_worker": round(m["worker_state_mb_max"], 1),
            "peak_rss_mb_rank0": round(m["worker_peak_rss_mb_max"]),
            "peak_rss_mb_other": round(m["worker_peak_rss_mb_min"]),
            "samples_per_s": round(m["samples_per_s"], 1), "epoch_s": round(m["epoch_seconds"], 2),
            "val_accuracy": round(summary["best_val_accuracy"], 2), "wall_s": round(time.perf_counter() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=4096, help="neurons per hidden layer")
    parser.add_argument("--depth", type=int, default=4, help="hidden layers")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32, help="per worker")
    parser.add_argument("--strategies", default="ssgd,fsdp", help="comma-separated: ssgd, fsdp, fsdp_keep")
    parser.add_argument("--unit-params", type=int, default=1_000_000, help="train.fsdp_unit_params")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)

    from optforge.tasks.techniques.data.data import DataConfig, load_splits
    from optforge.tasks.techniques.data.sources import prepare
    from optforge.tasks.techniques.models.models import ModelConfig, ModelSpec
    from optforge.tasks.workers.worker_common import ensure_ray

    tmp = Path(tempfile.mkdtemp(prefix="optforge-model-parallel-"))
    data_path = prepare(DataConfig(), tmp / "data")
    model_cfg = ModelConfig(hidden=(args.width,) * args.depth, dropout=0.0)
    spec = ModelSpec(model_cfg.to_dict(), load_splits(data_path).contract.to_dict())
    ensure_ray()
    rows = []
    for strategy in args.strategies.split(","):
        rows.append(run_one(strategy, args, data_path, spec, tmp))
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n{'strategy':<9}{'params':>12}{'params/worker':>15}{'state MB/worker':>17}{'peak RSS MB r0/r1':>20}"
          f"{'samples/s':>11}{'val acc':>9}")
    for r in rows:
        rss = f"{r['peak_rss_mb_rank0']}/{r['peak_rss_mb_other']}"
        print(f"{r['strategy']:<9}{r['params']:>12,}{r['params_per_worker']:>15,}{r['state_mb_per_worker']:>17}"
              f"{rss:>20}{r['samples_per_s']:>11}{r['val_accuracy']:>9}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
