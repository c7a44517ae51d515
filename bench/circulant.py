"""Block-circulant Linear layers (FFT) against the dense layer, across block sizes (a script, not a test).

One ``width x width`` layer, random weights, timed in PyTorch eager and in ONNX Runtime (the dynamo export:
DFT + Einsum nodes) at batch 1 and batch 64, the same threads for both; prints p50 latency, the speed-up
over the dense layer in the same runtime, and the weights stored.

    .venv/bin/python bench/circulant.py [--width 1024] [--blocks 4,8,16,32,64] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--blocks", default="4,8,16,32,64")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iters", type=int, default=200)
    args = p.parse_args()

    from optforge.flows.environment import quiet_libraries

    quiet_libraries()  # before torch is imported: torch reads TORCH_LOGS then
    import numpy as np
    import torch
    from torch import nn

    from optforge.tasks.techniques.compression.circulant import BlockCirculantLinear
    from optforge.tasks.techniques.contract import table_contract
    from optforge.tasks.techniques.measurement.benchmark import cpu_model, time_calls
    from optforge.tasks.techniques.onnx.export import ExportConfig, export_onnx
    from optforge.tasks.techniques.onnx.ort_session import tuned_session

    torch.set_num_threads(args.threads)
    w = args.width
    contract = table_contract(w, w)
    layers = {"dense": nn.Linear(w, w)} | {f"circ b={b}": BlockCirculantLinear(w, w, b)
                                          for b in map(int, args.blocks.split(","))}
    rng = np.random.default_rng(0)
    print(f"{w} x {w} layer, {cpu_model()}, {args.threads} thread(s), p50 of {args.iters} calls")
    print(f"{'layer':12} {'weights':>9} {'torch b1 us':>12} {'ort b1 us':>10} {'torch b64 us':>13} {'ort b64 us':>11}"
          f" {'x dense ort b1':>15} {'x dense ort b64':>16}")
    dense_ort = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, layer in layers.items():
            layer.eval()
            path = export_onnx(layer, contract, Path(tmp) / f"{name.replace(' ', '_')}.onnx", ExportConfig())
            session = tuned_session(path, args.threads, "all")
            row = []
            for batch in (1, 64):
                x = rng.standard_normal((batch, w)).astype(np.float32)
                xt = torch.from_numpy(x)
                with torch.inference_mode():
                    t_torch = np.median(time_calls(lambda v, f=layer: f(v), [xt] * args.iters, 20)) * 1e6
                t_ort = np.median(time_calls(lambda v, s=session: s.run(None, {"input": v}), [x] * args.iters, 20)) * 1e6
                row += [t_torch, t_ort]
            if name == "dense":
                dense_ort = {1: row[1], 64: row[3]}
            weights = sum(p.numel() for p in layer.parameters())
            print(f"{name:12} {weights:9,d} {row[0]:12.1f} {row[1]:10.1f} {row[2]:13.1f} {row[3]:11.1f}"
                  f" {dense_ort[1] / row[1]:14.2f}x {dense_ort[64] / row[3]:15.2f}x")


if __name__ == "__main__":
    main()
