"""Apache TVM (untuned and tuned) against ONNX Runtime on the default teacher's shape (a script, not a test).

(Not bench/tvm.py: a script named tvm.py shadows the tvm package, its folder being first on sys.path.)

The default teacher: an MLP 64 -> 2048 -> 2048 -> 1024 -> 10 (configs/default.yaml), random weights,
exported as the pipeline exports it. Each TVM build compiles batch 1 and batch 64 (one library each) for
this host's CPU; each trial budget tunes both. Prints compile and tuning seconds, p50 latency at batch 1
and throughput at batch 64, the same threads for both runtimes, all timed in this one process.

    .venv/bin/python bench/tvm_compile.py [--trials 0,64,256] [--threads 1] [--search evolutionary]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", default="0,64,256", help="trial budgets, comma-separated (0: untuned)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--search", default="evolutionary", choices=["evolutionary", "replay-trace"])
    p.add_argument("--iters", type=int, default=200, help="timed batch-1 calls (batch 64: a tenth)")
    args = p.parse_args()

    from optforge.flows.environment import quiet_libraries

    quiet_libraries()  # before torch is imported: torch reads TORCH_LOGS then
    import numpy as np
    import torch

    from optforge.tasks.techniques.contract import table_contract
    from optforge.tasks.techniques.engines.tvm import (
        TvmConfig,
        TvmRunner,
        compile_onnx,
        library_mb,
        resolve_target,
    )
    from optforge.tasks.techniques.measurement.benchmark import cpu_model, time_calls
    from optforge.tasks.techniques.models.models import MLP
    from optforge.tasks.techniques.onnx.export import ExportConfig, export_onnx
    from optforge.tasks.techniques.onnx.ort_session import onnx_predictor

    torch.manual_seed(0)
    contract = table_contract(64, 10)
    model = MLP(64, 10, (2048, 2048, 1024), 0.1).eval()
    rng = np.random.default_rng(0)
    b1 = [{"input": rng.standard_normal((1, 64)).astype(np.float32)} for _ in range(args.iters)]
    b64 = [{"input": rng.standard_normal((64, 64)).astype(np.float32)}] * max(3, args.iters // 10)

    def timed(predict) -> tuple[float, float]:
        p50_ms = float(np.percentile(time_calls(predict, b1, warmup=10), 50)) * 1e3
        sps = 64 * len(b64) / float(time_calls(predict, b64, warmup=2).sum())
        return p50_ms, sps

    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = export_onnx(model, contract, Path(tmp) / "teacher.onnx", ExportConfig())
        ort = onnx_predictor(onnx_path, args.threads)
        target = resolve_target(TvmConfig(threads=args.threads))
        print(f"default teacher MLP, {cpu_model()}, TVM target {target}, {args.threads} thread(s), "
              f"p50 of {args.iters} batch-1 calls, {len(b64)} batch-64 calls")
        print(f"{'variant':22} {'compile s':>10} {'tune s':>8} {'p50 b1 ms':>10} {'thr b64 /s':>11} {'MB':>7} "
              f"{'max|diff|':>10}")
        rows = [("onnxruntime", 0.0, 0.0, *timed(ort), onnx_path.stat().st_size / 1e6, 0.0)]
        print(f"{rows[0][0]:22} {'-':>10} {'-':>8} {rows[0][3]:10.3f} {rows[0][4]:11.0f} {rows[0][5]:7.1f} {'-':>10}")
        for trials in map(int, args.trials.split(",")):
            cfg = TvmConfig(trials=trials, threads=args.threads, search=args.search, batch_sizes=(1, 64))
            out = Path(tmp) / f"tvm_{trials}"
            build = compile_onnx(onnx_path, out, contract, cfg)
            runner = TvmRunner(out, args.threads)
            diff = float(np.abs(runner(b64[0]) - ort(b64[0])).max())
            p50, sps = timed(runner)
            name = f"tvm {trials} trials" if trials else "tvm untuned"
            print(f"{name:22} {build.compile_s:10.2f} {build.tune_s:8.1f} {p50:10.3f} {sps:11.0f} "
                  f"{library_mb(out):7.1f} {diff:10.2e}", flush=True)


if __name__ == "__main__":
    main()
