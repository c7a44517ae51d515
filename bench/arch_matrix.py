"""The architecture matrix: the default pipeline on each architecture users bring, architecture x chain.

Each architecture is a tiny random-weight folder from ``flows/architectures.py`` (transformers' own config
class, its own tokenizer or image processor), run through the optimize flow as a user would run it: a config
that sets the data, the model folder and ``train.epochs: 0``, so the model's family picks the chains
(``flows/defaults.py``). Chain fine-tuning is cut to one epoch and timing to a few calls: the table is about
whether each default chain ends as a variant (its batch-1 speed-up against PyTorch FP32 and its size), as a
skip decided before training (with its reason), or FAILED (with its error). Random weights: accuracy means
nothing here.

    .venv/bin/python bench/arch_matrix.py [--archs bert,resnet,...] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

QUICK = ["train.epochs=0", "benchmark.warmup=2", "benchmark.iters_b1=20", "benchmark.iters_batch=2",
         "compress.prune.finetune.epochs=1", "compress.factorize.finetune.epochs=1", "compress.qat.finetune.epochs=1",
         "compress.early_exit.finetune.epochs=1", "compress.distill.train.epochs=1",
         "compress.distill.train.num_workers=1", "onnx.static.calibration_samples=32", "register.enabled=false"]


def cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def run_one(name: str, root: Path) -> dict:
    from optforge.flows.architectures import TEXT_ARCHITECTURES, write_image_model, write_text_model
    from optforge.flows.examples import write_image_folder, write_text_csv
    from optforge.flows.optimize import optimize

    if name in TEXT_ARCHITECTURES:
        data = write_text_csv(root / "texts.csv", rows=150, long_every=10)
        texts = [line.split(",")[0] for line in data.read_text().splitlines()[1:]]
        folder = write_text_model(name, root / name, texts, num_labels=3)
        data_cfg = [f"data.source={data}", "data.text_column=text"]
    else:
        data = write_image_folder(root / "images", per_class=8, size=40)
        folder = write_image_model(name, root / name, num_labels=10)
        data_cfg = [f"data.source={data}"]
    start = time.perf_counter()
    try:
        summary = optimize(overrides=[*data_cfg, "model.arch=huggingface", f"model.path={folder}", *QUICK,
                                      f"tracking.workdir={root / 'work'}", f"tracking.experiment=matrix-{name}"])
    except Exception as exc:  # the whole run failed: the matrix's target is that this never happens
        return {"arch": name, "run": f"CRASHED: {type(exc).__name__}: {str(exc)[:200]}", "cells": {}}
    rows = {v["variant"]: v for v in summary["variants"]}
    cells = {}
    for variant, row in rows.items():
        if row.get("failed"):
            cells[variant] = f"FAILED {row['failed'][:80]}"
        elif row.get("skipped"):
            cells[variant] = f"skipped: {row['skipped'][:80]}"
        else:
            cells[variant] = f"{row['speedup_b1']:.2f}x b1, {row['size_mb']:.3f} MB"
    for variant, why in summary["skipped"].items():
        cells.setdefault(variant, f"skipped: {why[:80]}")
    return {"arch": name, "run": f"ok in {time.perf_counter() - start:.0f} s", "cells": cells}


def main() -> None:
    from optforge.flows.architectures import IMAGE_ARCHITECTURES, TEXT_ARCHITECTURES
    from optforge.flows.environment import embedded_defaults, quiet_libraries

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", default=",".join([*TEXT_ARCHITECTURES, *IMAGE_ARCHITECTURES]))
    parser.add_argument("--json")
    args = parser.parse_args()
    embedded_defaults()
    quiet_libraries(False)
    results = []
    print(f"CPU: {cpu_name()}", flush=True)
    for name in args.archs.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            result = run_one(name, Path(tmp))
        results.append(result)
        print(f"\n## {name}: {result['run']}", flush=True)
        for variant, cell in result["cells"].items():
            print(f"  {variant:32} {cell}", flush=True)
    variants = sum(1 for r in results for c in r["cells"].values() if not c.startswith(("skipped", "FAILED")))
    failed = sum(1 for r in results for c in r["cells"].values() if c.startswith("FAILED"))
    crashed = sum(1 for r in results if r["run"].startswith("CRASHED"))
    print(f"\n{len(results)} architectures: {crashed} crashed runs, {variants} variants, {failed} failed variants")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    sys.exit(main())
