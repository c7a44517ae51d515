"""Ray Data (``get_dataset_shard``) against a DataLoader with a distributed sampler, feeding Ray Train
workers from a split folder's memory-mapped arrays (a script, not a timed test).

The pipeline stores every split as ``.npy`` files that workers open memory-mapped (``tasks/techniques/data/data.py``).
Two ways to shard them over the training workers, both lazy (neither loads the split whole):

- ``loader``: what the workers do today: a ``DataLoader`` over ``PartDataset`` (the pipeline's own) with a
  distributed sampler (each worker reads its own indices, in its own process, no copies through Ray);
- ``ray_data``: ``ray.data.range(N).map_batches(read rows)`` passed to the trainer as a dataset; each
  worker iterates ``get_dataset_shard("train").iter_torch_batches``. Rows are read by Ray Data tasks
  and travel through the object store (``/dev/shm``) to the workers.

For each, one Ray Train run of ``--epochs`` epochs on ``--workers`` workers (one torch thread each) over
``--rows`` images of 3 x ``--size`` x ``--size`` float32 (written once), with a small model step per batch
so both pay the same compute. Printed: samples/s (the median epoch after the first), each worker's peak
anonymous memory (``RssAnon``: memory-mapped pages the kernel can drop are not counted) and the peak of
the whole process tree's anonymous memory plus the object store's use of ``/dev/shm``, sampled every 0.2 s.

    .venv/bin/python bench/data_loading.py [--rows 12000] [--size 96] [--epochs 3] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from proc_memory import TreeSampler, anon_mb  # bench/ is sys.path[0] when run as a script

BATCH = 64


def write_data(folder: Path, rows: int, size: int) -> Path:
    """``inputs.npy`` (rows x 3 x size x size float32) and ``labels.npy``, written a chunk at a time."""
    folder.mkdir(parents=True, exist_ok=True)
    x = np.lib.format.open_memmap(folder / "inputs.npy", mode="w+", dtype=np.float32, shape=(rows, 3, size, size))
    rng = np.random.default_rng(0)
    for start in range(0, rows, 1024):
        stop = min(rows, start + 1024)
        x[start:stop] = rng.standard_normal((stop - start, 3, size, size), dtype=np.float32)
    x.flush()
    np.save(folder / "labels.npy", rng.integers(0, 10, rows))
    return folder


class ReadRows:
    """Ray Data ``map_batches`` callable: ids -> those rows of the memory-mapped arrays."""

    def __init__(self, folder: str):
        self.x = np.load(Path(folder) / "inputs.npy", mmap_mode="r")
        self.y = np.load(Path(folder) / "labels.npy", mmap_mode="r")

    def __call__(self, batch: dict) -> dict:
        ids = np.sort(batch["id"])
        return {"pixel_values": np.asarray(self.x[ids]), "labels": np.asarray(self.y[ids])}


def train_loop(config: dict) -> None:
    """One worker: ``epochs`` passes over its shard with a small model; reports per-epoch throughput."""
    import torch
    from ray import train
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler

    torch.set_num_threads(1)
    ctx = train.get_context()
    world, rank = ctx.get_world_size(), ctx.get_world_rank()
    model = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(8), torch.nn.Flatten(), torch.nn.Linear(3 * 64, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    if config["mode"] == "loader":
        from optforge.tasks.techniques.data.data import Part
        from optforge.tasks.workers.worker_common import PartDataset

        folder = Path(config["folder"])
        part = Part({"pixel_values": np.load(folder / "inputs.npy", mmap_mode="r")},
                    np.load(folder / "labels.npy", mmap_mode="r"))
        dataset = PartDataset(part)  # what the training workers read through
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=0)
        loader = DataLoader(dataset, batch_size=BATCH, sampler=sampler)

        def batches(epoch):
            sampler.set_epoch(epoch)
            for inputs, labels in loader:
                yield inputs["pixel_values"], labels
    else:
        shard = train.get_dataset_shard("train")

        def batches(epoch):
            for b in shard.iter_torch_batches(batch_size=BATCH, local_shuffle_buffer_size=None):
                yield b["pixel_values"], b["labels"]

    base = anon_mb()
    peak, epochs = base, []
    for epoch in range(config["epochs"]):
        start, seen = time.perf_counter(), 0
        for x, y in batches(epoch):
            loss = torch.nn.functional.cross_entropy(model(x), torch.as_tensor(y))
            opt.zero_grad()
            loss.backward()
            opt.step()
            seen += len(y)
            peak = max(peak, anon_mb())
        epochs.append({"samples": seen, "seconds": time.perf_counter() - start})
    # Each worker writes its own figures (Ray Train keeps only rank 0's reported metrics).
    out = Path(config["folder"]).parent / f"stats-{config['mode']}-{rank}.json"
    out.write_text(json.dumps({"epochs": epochs, "anon_base_mb": base, "anon_peak_mb": peak}))
    train.report({"done": 1})


def run_mode(mode: str, folder: Path, args) -> dict:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    rows = len(np.load(folder / "labels.npy", mmap_mode="r"))
    datasets = {}
    if mode == "ray_data":
        datasets["train"] = ray.data.range(rows).random_shuffle(seed=0).map_batches(
            ReadRows, fn_constructor_args=(str(folder),), batch_size=BATCH, compute=ray.data.ActorPoolStrategy(size=1))
    sampler = TreeSampler()
    sampler.start()
    start = time.perf_counter()
    trainer = TorchTrainer(train_loop, train_loop_config={"mode": mode, "folder": str(folder), "epochs": args.epochs},
                           scaling_config=ScalingConfig(num_workers=args.workers, resources_per_worker={"CPU": 1}),
                           datasets=datasets or None,
                           run_config=RunConfig(name=f"data-{mode}", storage_path=str(folder.parent / "ray")))
    result = trainer.fit()
    wall = time.perf_counter() - start
    tree_peak = sampler.stop()
    if result.error:
        raise result.error
    stats = [json.loads((folder.parent / f"stats-{mode}-{r}.json").read_text()) for r in range(args.workers)]
    # all workers' samples over the slowest worker's time, per epoch
    per_epoch = [sum(s["epochs"][e]["samples"] for s in stats) / max(s["epochs"][e]["seconds"] for s in stats)
                 for e in range(args.epochs)]
    return {"mode": mode, "samples_per_s": statistics.median(per_epoch[1:] or per_epoch), "wall_s": wall,
            "worker_anon_peak_mb": max(s["anon_peak_mb"] for s in stats),
            "worker_anon_growth_mb": max(s["anon_peak_mb"] - s["anon_base_mb"] for s in stats),
            "tree_peak_mb": tree_peak, "tree_growth_mb": tree_peak - sampler.base}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=12000)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--modes", default="loader,ray_data")
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    import ray

    with tempfile.TemporaryDirectory(prefix="optforge-data-bench-") as tmp:
        folder = write_data(Path(tmp) / "train", args.rows, args.size)
        data_mb = (folder / "inputs.npy").stat().st_size / 2**20
        # Ray Data's read tasks need CPUs beside the training workers' (logical CPUs: this oversubscribes the cores, as
        # a real cluster with spare CPUs for data would not need to).
        ray.init(num_cpus=args.workers + 2, include_dashboard=False, log_to_driver=False)
        try:
            results = [run_mode(mode, folder, args) for mode in args.modes.split(",")]
        finally:
            ray.shutdown()
    print(f"\n{args.rows} rows of 3x{args.size}x{args.size} float32 = {data_mb:,.0f} MB, {args.workers} workers, "
          f"batch {BATCH}, {args.epochs} epochs")
    header = f"{'mode':10} {'samples/s':>10} {'wall s':>7} {'worker anon peak MB':>20} {'worker growth MB':>17} " \
             f"{'tree+shm peak MB':>17} {'tree+shm growth MB':>19}"
    print(header + "\n" + "-" * len(header))
    for r in results:
        print(f"{r['mode']:10} {r['samples_per_s']:>10,.0f} {r['wall_s']:>7.1f} {r['worker_anon_peak_mb']:>20,.0f} "
              f"{r['worker_anon_growth_mb']:>17,.0f} {r['tree_peak_mb']:>17,.0f} {r['tree_growth_mb']:>19,.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
