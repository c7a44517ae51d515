"""Where ssgd's 2-worker throughput goes, without Ray (a script, not a timed test).

Trains the same model (``--set model.*`` overrides, default: the 6.4 M-parameter teacher MLP) on random
batches in three ways, 1 torch thread per process, and prints samples/s:

- ``solo``: one process, no communication (the 1-worker baseline);
- ``nocomm``: two processes side by side, each training alone (what sharing the machine costs);
- ``ddp`` and variants: two processes under DistributedDataParallel over gloo on 127.0.0.1
  (``ddp_view``: ``gradient_as_bucket_view``; ``ddp_onebucket``: one 256 MB bucket; ``ddp_fp16``: the
  fp16 compression hook).

The gap between ``nocomm`` and ``ddp`` is the cost of the per-step gradient all-reduce; the gap between
``2 x solo`` and ``nocomm`` is the machine's own.

    .venv/bin/python bench/ddp_overhead.py [--steps 150] [--batch 64] [--variants solo,nocomm,ddp,...]
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS = ("solo", "nocomm", "ddp", "ddp_view", "ddp_onebucket", "ddp_fp16")
WARMUP_STEPS = 10


def _model(overrides: list[str]):
    import torch

    from optforge.flows.params import load_config
    from optforge.tasks.techniques.contract import table_contract
    from optforge.tasks.techniques.models.models import ModelSpec
    from optforge.tasks.techniques.models.rebuild import build_model

    cfg = load_config(None, overrides)
    torch.manual_seed(0)  # both ranks build identical weights (DDP would broadcast them anyway)
    return build_model(ModelSpec(cfg.model.to_dict(), table_contract(64, 10, (1, 8, 8)).to_dict()))  # digits' shape


def _samples_per_s(model, steps: int, batch: int) -> float:
    import torch

    from optforge.tasks.techniques.contract import forward_logits
    from optforge.tasks.techniques.training.training import TrainConfig, make_optimizer

    x, y = {"input": torch.randn(batch, 64)}, torch.randint(0, 10, (batch,))  # a batch as the training loop sees it
    opt = make_optimizer(model, TrainConfig())  # the optimizer training uses (fused AdamW)
    loss_fn = torch.nn.CrossEntropyLoss()
    for i in range(WARMUP_STEPS + steps):
        if i == WARMUP_STEPS:
            start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss_fn(forward_logits(model, x), y).backward()
        opt.step()
    return steps * batch / (time.perf_counter() - start)


def _rank(rank: int, variant: str, port: int, args, results) -> None:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    model = _model(args.set)
    if variant != "nocomm":
        kwargs = {"gradient_as_bucket_view": variant == "ddp_view"}
        if variant == "ddp_onebucket":
            kwargs["bucket_cap_mb"] = 256
        model = DistributedDataParallel(model, **kwargs)
        if variant == "ddp_fp16":
            from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

            model.register_comm_hook(None, default_hooks.fp16_compress_hook)
    results.put(_samples_per_s(model, args.steps, args.batch))
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch", type=int, default=64, help="per process")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="model config override")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.variants.split(",")) - set(VARIANTS))
    if unknown:
        parser.error(f"--variants: unknown {unknown}; expected some of {list(VARIANTS)}")

    import torch
    import torch.multiprocessing as mp

    torch.set_num_threads(1)
    params = sum(p.numel() for p in _model(args.set).parameters())
    print(f"model: {params / 1e6:.2f} M parameters ({params * 4 / 2**20:.1f} MiB of fp32 gradients per step)")
    solo = None
    for variant in args.variants.split(","):
        if variant == "solo":
            solo = _samples_per_s(_model(args.set), args.steps, args.batch)
            print(f"{variant:<14} {solo:8.0f} samples/s", flush=True)
            continue
        ctx = mp.get_context("spawn")
        results = ctx.Queue()
        port = _free_port()
        procs = [ctx.Process(target=_rank, args=(r, variant, port, args, results)) for r in range(2)]
        for p in procs:
            p.start()
        rates = [results.get(timeout=600) for _ in procs]
        for p in procs:
            p.join()
        total = sum(rates)
        ratio = f" = {total / solo:.2f}x solo" if solo else ""
        print(f"{variant:<14} {total:8.0f} samples/s (per process {min(rates):.0f}-{max(rates):.0f}){ratio}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
