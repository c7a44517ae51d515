"""Every variant of a real-size model against its PyTorch FP32 baseline, on this CPU (a script, not a timed test).

Two Hugging Face models with random weights, each saved with ``save_pretrained`` and run through the
optimize flow as a user's model (``model.arch=huggingface``, ``train.epochs=0``: the given model is the
baseline, nothing is trained):

- ``bert``: a BERT-base-size classifier (12 layers, hidden 768, 12 heads, vocabulary 30,522) on
  generated texts tokenized to 128 tokens by a WordPiece tokenizer trained here;
- ``resnet``: a ResNet-50-size classifier (bottleneck blocks 3-4-6-3, widths 256-2048) on 224x224 RGB
  images (the digits, upscaled).

Every variant the default config makes for such a model is built (the plan skips the chains that cannot
apply, and says why); the table gives, per variant, p50 latency at batch 1, throughput at batch 64, size
on disk and the ratios against ``pytorch_fp32``, then the peak memory of the whole run (anonymous memory
of the process tree, Ray workers included, plus the object store; see ``proc_memory.py``). The weights
are random, so accuracy is not reported: compare speed and size.

Timing uses fewer calls than the default (``--iters-b1``, ``--iters-b64``) because one BERT-base batch of
64 takes seconds here; ``--threads`` is the intra-op thread count of every variant's timing.

    .venv/bin/python bench/real_models.py [--models bert,resnet] [--rows 240] [--threads 2] [--chains targets|default]
        [--json OUT]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from proc_memory import TreeSampler  # bench/ is sys.path[0] when run as a script

BASELINE = "pytorch_fp32"


def write_bert_base(root: Path, rows: int) -> tuple[Path, Path]:
    """A text CSV and a BERT-base-size classifier folder with its own tokenizer."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from optforge.flows.examples import train_tokenizer, write_text_csv

    texts_csv = write_text_csv(root / "texts.csv", rows=rows, long_every=3)
    with open(texts_csv) as fh:
        texts = [row["text"] for row in csv.DictReader(fh)]
    folder = root / "bert_base"
    train_tokenizer(texts, folder)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                        intermediate_size=3072, max_position_embeddings=512, num_labels=3)
    BertForSequenceClassification(config).save_pretrained(str(folder))
    return texts_csv, folder


def write_resnet50(root: Path, rows: int) -> tuple[Path, Path]:
    """A folder of 224x224 RGB digit images and a ResNet-50-size classifier folder."""
    import torch
    from transformers import ResNetConfig, ResNetForImageClassification

    from optforge.flows.examples import write_image_folder

    images = write_image_folder(root / "images", per_class=max(2, rows // 10), size=224)
    folder = root / "resnet50"
    torch.manual_seed(0)
    config = ResNetConfig(num_channels=3, embedding_size=64, hidden_sizes=[256, 512, 1024, 2048], depths=[3, 4, 6, 3],
                          layer_type="bottleneck", num_labels=10)
    ResNetForImageClassification(config).save_pretrained(str(folder))
    return images, folder


MODELS = {
    "bert": (write_bert_base, ["data.text_column=text", "data.label_column=label", "data.max_length=128"]),
    "resnet": (write_resnet50, ["data.image_size=224"]),
}
# The chains issue 13's targets are about, one fine-tuning epoch each (random weights: speed, not accuracy).
# BERT: ORT's fusion and dynamic INT8 of the model (onnx_fused_int8_dynamic, built for any BERT), the
# 6-layer DistilBERT-style student derived from it, fused and INT8, and SVD + INT8. ResNet: per-channel
# static INT8 of the model, and half its FLOPs pruned, then static INT8 or quantization-aware fine-tuning.
CHAINS = {
    "bert": ["compress.chains=[[distill, fuse, quantize], [factorize, quantize]]", "compress.distill.derive=layers",
             "compress.distill.train.epochs=1", "compress.distill.train.num_workers=1",
             "compress.distill.train.batch_size=16"],
    "resnet": ["compress.chains=[[prune, static], [prune, qat]]", "compress.prune.target=flops",
               "compress.prune.sparsity=0.5", "compress.prune.rounds=1", "compress.prune.finetune.epochs=1",
               "compress.qat.finetune.epochs=1", "compress.qat.finetune.batch_size=16",
               "onnx.static.per_channel=true"],
}
ORT_FP32 = "onnx_fp32"


def run_model(name: str, args, root: Path) -> dict:
    from optforge.flows.optimize import optimize

    write, data_overrides = MODELS[name]
    data, model = write(root / name, args.rows)
    overrides = [
        f"data.source={data}", *data_overrides, "model.arch=huggingface", f"model.path={model}", "train.epochs=0",
        f"tracking.workdir={root / 'work'}", f"benchmark.threads={args.threads}", "benchmark.warmup=2",
        f"benchmark.iters_b1={args.iters_b1}", f"benchmark.iters_batch={args.iters_b64}",
        "compress.factorize.finetune.epochs=1", f"compress.factorize.finetune.threads={args.threads}",
        f"compress.prune.finetune.threads={args.threads}", f"compress.qat.finetune.threads={args.threads}",
        "register.enabled=false", *(CHAINS[name] if args.chains == "targets" else []), *args.set,
    ]
    sampler = TreeSampler()
    sampler.start()
    start = time.perf_counter()
    summary = optimize(config_path=None, overrides=overrides)
    wall = time.perf_counter() - start
    peak = sampler.stop()
    by_name = {v["variant"]: v for v in summary["variants"]}
    base, ort_fp32 = by_name[BASELINE], by_name.get(ORT_FP32, by_name[BASELINE])
    rows = [{"model": name, "variant": v["variant"], "p50_b1_ms": v["latency_ms_p50_b1"],
             "thr_b64": v["throughput_sps_b64"], "size_mb": v["size_mb"],
             "speedup_b1": base["latency_ms_p50_b1"] / v["latency_ms_p50_b1"],
             "speedup_b64": v["throughput_sps_b64"] / base["throughput_sps_b64"],
             "vs_ort_b64": v["throughput_sps_b64"] / ort_fp32["throughput_sps_b64"],
             "smaller": base["size_mb"] / v["size_mb"]} for v in summary["variants"]
            if v.get("latency_ms_p50_b1") is not None]
    return {"model": name, "rows": rows, "skipped": summary.get("skipped", {}), "wall_s": wall,
            "peak_mb": peak, "base_mb": sampler.base,
            "stages": {s["stage"]: s["seconds"] for s in summary["stages"]}}


def render(result: dict) -> str:
    header = ("variant", "p50 b1 ms", "speed-up b1", "b64 samples/s", "speed-up b64", "vs ORT FP32 b64", "size MB",
              "smaller")
    body = [(r["variant"], f"{r['p50_b1_ms']:.1f}", f"{r['speedup_b1']:.2f}x", f"{r['thr_b64']:.1f}",
             f"{r['speedup_b64']:.2f}x", f"{r['vs_ort_b64']:.2f}x", f"{r['size_mb']:.1f}", f"{r['smaller']:.2f}x")
            for r in result["rows"]]
    widths = [max(len(str(x[i])) for x in [header, *body]) for i in range(len(header))]

    def fmt(cells) -> str:
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    lines = [(f"\n== {result['model']}: run {result['wall_s']:.0f} s, peak memory {result['peak_mb']:,.0f} MB "
             f"(process tree + object store; {result['base_mb']:,.0f} MB before the run)"),
             fmt(header), fmt(["-" * w for w in widths]), *map(fmt, body)]
    lines += [f"skipped {k}: {v}" for k, v in result["skipped"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="bert,resnet", help="comma-separated: bert, resnet")
    parser.add_argument("--rows", type=int, default=240, help="texts or images to write (splits as configured)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--iters-b1", type=int, default=20)
    parser.add_argument("--iters-b64", type=int, default=3)
    parser.add_argument("--chains", choices=("targets", "default"), default="targets",
                        help="targets: the chains of issue 13's targets (CHAINS); default: the default config's chains")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more config overrides")
    parser.add_argument("--workdir", help="keep the models, data and MLflow store here (default: a temporary folder)")
    parser.add_argument("--json", help="also write the results as JSON to this file")
    args = parser.parse_args(argv)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")

    with tempfile.TemporaryDirectory(prefix="optforge-real-models-") as tmp:
        root = Path(args.workdir or tmp).resolve()
        os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        results = [run_model(name, args, root) for name in args.models.split(",")]
    for result in results:
        print(render(result))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
