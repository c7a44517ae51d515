"""Prefect tasks: prune and factorize a PyTorch model folder, or fine-tune it aware of INT8 (QAT), in-process.

Fine-tuning runs in the task's process with the functional core's loop rather than on Ray Train: it
is a few epochs of a model that is already trained, seconds of work next to Ray Train's ~25 s of
fixed start-up. It can distill from the pipeline's teacher (``finetune.kd_alpha``), reading the same
cached teacher logits as the distill stage.
"""

from __future__ import annotations

import mlflow
import numpy as np

from optforge.tasks.runtime.caching import stage_dir, stage_task
from optforge.tasks.runtime.progress import StageProgress
from optforge.tasks.runtime.refs import DataRef, Format, ModelRef, file_sha256
from optforge.tasks.runtime.tracking import child_run
from optforge.tasks.stages.distill import teacher_logits_file
from optforge.tasks.techniques.compression import binarize
from optforge.tasks.techniques.compression import cluster as clustering
from optforge.tasks.techniques.compression.binarize import BinarizeConfig
from optforge.tasks.techniques.compression.circulant import CirculantConfig, to_circulant
from optforge.tasks.techniques.compression.cluster import ClusterConfig
from optforge.tasks.techniques.compression.factorize import FactorizeConfig
from optforge.tasks.techniques.compression.factorize import factorize as factorize_model
from optforge.tasks.techniques.compression.graph_prune import widths
from optforge.tasks.techniques.compression.packing import PACKED_FILE
from optforge.tasks.techniques.compression.prune import PruneConfig
from optforge.tasks.techniques.compression.prune import prune as prune_model
from optforge.tasks.techniques.compression.qat import QatConfig, calibrate, export_qdq, prepare, settled_reduce_range
from optforge.tasks.techniques.contract import as_tensors
from optforge.tasks.techniques.data.data import Splits, load_splits
from optforge.tasks.techniques.measurement.flops import model_stats
from optforge.tasks.techniques.models.models import save_model
from optforge.tasks.techniques.models.rebuild import load_model
from optforge.tasks.techniques.onnx.static import accuracy as onnx_accuracy
from optforge.tasks.techniques.onnx.static import count_qdq_nodes
from optforge.tasks.techniques.training.finetune import FinetuneConfig, finetune
from optforge.tasks.techniques.training.training import evaluate

CALIBRATION_ROWS = 512  # training rows whose activations set QAT's starting ranges
UNSTRUCTURED_NOTE = ("unstructured sparsity {:.1%}: the tensors stay dense, so dense kernels (PyTorch, ONNX Runtime) "
                     "do the same work and the file keeps its size; it pays only with sparse kernels or compression")


def _soft_targets(cfg: FinetuneConfig, teacher: ModelRef, data: DataRef, workdir: str) -> np.ndarray | None:
    if cfg.epochs == 0 or cfg.kd_alpha == 0:
        return None
    with np.load(teacher_logits_file(teacher, data, workdir), allow_pickle=False) as z:
        return z["train"]


def _tuner(cfg: FinetuneConfig, splits: Splits, soft: np.ndarray | None, label: str):
    """``finetune(model, round)`` for the techniques; shows its progress, logs each round's validation accuracy."""
    def tune(model, step: int = 0) -> dict:
        with StageProgress(f"{label} fine-tune", cfg.epochs) as progress:
            feed = progress.feed()
            result = finetune(model, splits.train, splits.val, cfg, soft, on_epoch=feed.epoch, on_batch=feed.batch)
        mlflow.log_metrics({"val_accuracy_before_finetune": result["val_accuracy_before"],
                            "val_accuracy": result["val_accuracy"]}, step=step)
        return result

    return tune


def log_result(net, before: dict, acc_before: float, splits: Splits) -> dict:
    """Test accuracy, params, FLOPs and sparsity after the stage; ratios are against the stage's input model."""
    after = model_stats(net, splits.contract)
    acc = evaluate(net, splits.test)["accuracy"]
    mlflow.log_metrics({
        "accuracy_before": acc_before, "accuracy": acc, "params_before": before["params"], "params": after["params"],
        "flops_before": before["flops"], "flops": after["flops"], "sparsity": after["sparsity"],
        "params_ratio": after["params"] / before["params"], "flops_ratio": after["flops"] / max(1, before["flops"]),
    })
    return after | {"accuracy": acc}


def output_and_tags(stage: str, cfg, model: ModelRef, teacher: ModelRef, data: DataRef, workdir: str) -> tuple:
    """The stage's output folder (keyed like its cache) and the tags linking its run to its inputs' runs."""
    out = stage_dir(workdir, stage, {stage: cfg, "model": model, "teacher": teacher, "data": data})
    return out, {"optforge.source_run": model.run_id or "", "optforge.teacher_run": teacher.run_id or ""}


def open_input(model: ModelRef, data: DataRef) -> tuple:
    """The input model, its spec, the splits, and the model's stats and test accuracy before the stage."""
    net, spec = load_model(model.path)
    splits = load_splits(data.path)
    return net, spec, splits, model_stats(net, splits.contract), evaluate(net, splits.test)["accuracy"]


def torch_ref(name: str, folder, run_id: str, info: dict) -> ModelRef:
    return ModelRef(name, Format.TORCH, str(folder), file_sha256(folder), run_id, info)


@stage_task("prune")
def prune(cfg: PruneConfig, model: ModelRef, teacher: ModelRef, data: DataRef, workdir: str,
          parent_run_id: str | None, run_name: str = "prune") -> ModelRef:
    """Prune ``model`` (structured or unstructured, iteratively) and fine-tune after each round."""
    out, tags = output_and_tags("prune", cfg, model, teacher, data, workdir)
    with child_run(parent_run_id, "prune", run_name=run_name, params={"prune": cfg.to_dict()}, tags=tags,
                   system_metrics=True) as run:
        net, spec, splits, before, acc_before = open_input(model, data)
        tune = _tuner(cfg.finetune, splits, _soft_targets(cfg.finetune, teacher, data, workdir), run_name)
        widths_before = widths(net)
        net, spec = prune_model(net, spec, cfg, tune)
        info = log_result(net, before, acc_before, splits)
        if cfg.method == "unstructured":
            mlflow.set_tag("optforge.note", UNSTRUCTURED_NOTE.format(info["sparsity"]))
        else:  # layer -> [width before, after], for the layers that lost outputs
            shrunk = {name: [widths_before[name], w] for name, w in widths(net).items() if w != widths_before[name]}
            mlflow.log_dict(shrunk, "pruned_widths.json")
            mlflow.log_metric("pruned_layers", len(shrunk))
        save_model(net, spec, out / "model")
        mlflow.log_artifacts(str(out / "model"), "model")
    return torch_ref("prune", out / "model", run.info.run_id, info)


@stage_task("factorize")
def factorize(cfg: FactorizeConfig, model: ModelRef, teacher: ModelRef, data: DataRef, workdir: str,
              parent_run_id: str | None, run_name: str = "factorize") -> ModelRef:
    """Replace Linear (and 1x1 conv) layers by SVD low-rank pairs where that is cheaper, then fine-tune."""
    out, tags = output_and_tags("factorize", cfg, model, teacher, data, workdir)
    with child_run(parent_run_id, "factorize", run_name=run_name, params={"factorize": cfg.to_dict()}, tags=tags) as run:
        net, spec, splits, before, acc_before = open_input(model, data)
        net, spec, report = factorize_model(net, spec, cfg)
        mlflow.log_dict(report, "factorize_report.json")
        mlflow.log_params({f"rank.{name}": r["rank"] if r["factorized"] else "kept" for name, r in report.items()})
        mlflow.log_metric("accuracy_before_finetune", evaluate(net, splits.test)["accuracy"])
        _tuner(cfg.finetune, splits, _soft_targets(cfg.finetune, teacher, data, workdir), run_name)(net)
        info = log_result(net, before, acc_before, splits)
        save_model(net, spec, out / "model")
        mlflow.log_artifacts(str(out / "model"), "model")
    return torch_ref("factorize", out / "model", run.info.run_id, info | {"ranks": dict(spec.factorized or {})})


@stage_task("qat")
def qat(cfg: QatConfig, model: ModelRef, teacher: ModelRef, data: DataRef, workdir: str, parent_run_id: str | None,
        run_name: str = "qat") -> ModelRef:
    """Quantization-aware fine-tuning of ``model`` (distilling from ``teacher``), exported as a QDQ INT8 ONNX model."""
    out = stage_dir(workdir, "qat", {"qat": cfg, "model": model, "teacher": teacher, "data": data})
    tags = {"optforge.source_run": model.run_id or "", "optforge.teacher_run": teacher.run_id or ""}
    with child_run(parent_run_id, "qat", run_name=run_name, params={"qat": cfg.to_dict()}, tags=tags,
                   system_metrics=True) as run:
        net, _ = load_model(model.path)
        splits = load_splits(data.path)
        acc_fp32 = evaluate(net, splits.test)["accuracy"]
        reduce_range = settled_reduce_range(cfg.reduce_range)
        mlflow.log_param("qat_reduce_range", reduce_range)  # what this machine's CPU decided, when the config did not
        prepared = prepare(net, splits.contract, cfg.momentum, reduce_range)
        calibrate(prepared, (as_tensors(inputs) for inputs, _ in splits.train.head(CALIBRATION_ROWS).batches(64)))
        # The same quantizer before any fine-tuning: what post-training INT8 of this model would give.
        acc_ptq = onnx_accuracy(export_qdq(prepared, splits.contract, out / "before.onnx", cfg.opset), splits.test)
        (out / "before.onnx").unlink()
        _tuner(cfg.finetune, splits, _soft_targets(cfg.finetune, teacher, data, workdir), run_name)(prepared)
        path = export_qdq(prepared, splits.contract, out / "model.onnx", cfg.opset)
        acc = onnx_accuracy(path, splits.test)
        mlflow.log_metrics({"accuracy_fp32": acc_fp32, "accuracy_before_finetune": acc_ptq, "accuracy": acc,
                            "qdq_nodes": count_qdq_nodes(path)})
        mlflow.log_artifact(str(path), "onnx")
    info = {k: v for k, v in model.info.items() if k in ("flops", "params")} | {"accuracy": acc}
    return ModelRef("qat", Format.ONNX, str(path), file_sha256(path), run.info.run_id, info)


@stage_task("circulant")
def circulant(cfg: CirculantConfig, model: ModelRef, teacher: ModelRef, data: DataRef, workdir: str,
              parent_run_id: str | None, run_name: str = "circulant") -> ModelRef:
    """Replace large Linear layers by block-circulant layers (FFT), projected from the dense weights, then fine-tune."""
    out, tags = output_and_tags("circulant", cfg, model, teacher, data, workdir)
    with child_run(parent_run_id, "circulant", run_name=run_name, params={"circulant": cfg.to_dict()}, tags=tags,
                   system_metrics=True) as run:
        net, spec, splits, before, acc_before = open_input(model, data)
        blocks = to_circulant(net, cfg)
        spec = spec.then("circulant", {"blocks": blocks})
        mlflow.log_metrics({"circulant_layers": len(blocks),
                            "accuracy_before_finetune": evaluate(net, splits.test)["accuracy"]})
        _tuner(cfg.finetune, splits, _soft_targets(cfg.finetune, teacher, data, workdir), run_name)(net)
        info = log_result(net, before, acc_before, splits)
        save_model(net, spec, out / "model")
        mlflow.log_artifacts(str(out / "model"), "model")
    return torch_ref("circulant", out / "model", run.info.run_id, info | {"circulant": blocks})


@stage_task("cluster")
def cluster_weights(cfg: ClusterConfig, model: ModelRef, teacher: ModelRef, data: DataRef, workdir: str,
                    parent_run_id: str | None, run_name: str = "cluster") -> ModelRef:
    """Cluster each large layer's weights into ``2**bits`` shared values, fine-tune them, store them bit-packed."""
    def store(net, folder):
        return clustering.pack(net, clustering.bake(net), cfg.bits, folder / PACKED_FILE)

    return _few_values_stage("cluster", cfg, model, teacher, data, workdir, parent_run_id, run_name,
                             lambda net: clustering.cluster(net, cfg), store)


@stage_task("binarize")
def binarize_weights(cfg: BinarizeConfig, model: ModelRef, teacher: ModelRef, data: DataRef, workdir: str,
                     parent_run_id: str | None, run_name: str = "binarize") -> ModelRef:
    """Binary weights (sign x per-channel scale) for the inner layers, fine-tuned straight-through, stored 1 bit each."""
    def store(net, folder):
        return binarize.pack(net, binarize.bake(net), folder / PACKED_FILE)

    return _few_values_stage("binarize", cfg, model, teacher, data, workdir, parent_run_id, run_name,
                             lambda net: binarize.binarize(net, cfg), store)


def _few_values_stage(stage: str, cfg, model: ModelRef, teacher: ModelRef, data: DataRef, workdir: str,
                      parent_run_id: str | None, run_name: str, apply, store) -> ModelRef:
    """Cluster and binarize alike: ``apply`` parametrizes the layers, fine-tuning trains through it, ``store``
    bakes the weights and writes the packed form beside the saved float model (what the benchmark sizes)."""
    out, tags = output_and_tags(stage, cfg, model, teacher, data, workdir)
    with child_run(parent_run_id, stage, run_name=run_name, params={stage: cfg.to_dict()}, tags=tags,
                   system_metrics=True) as run:
        net, spec, splits, before, acc_before = open_input(model, data)
        layers = apply(net)
        mlflow.log_metric("accuracy_before_finetune", evaluate(net, splits.test)["accuracy"])
        _tuner(cfg.finetune, splits, _soft_targets(cfg.finetune, teacher, data, workdir), run_name)(net)
        folder = out / "model"
        folder.mkdir(parents=True, exist_ok=True)
        stored = store(net, folder)
        info = log_result(net, before, acc_before, splits)
        save_model(net, spec, folder)
        float_bytes = (folder / "model.pt").stat().st_size
        mlflow.log_metrics({"compacted_layers": len(layers), "stored_mb": stored / 1e6, "stored_ratio": float_bytes / stored})
        mlflow.log_artifacts(str(folder), "model")
    return torch_ref(stage, folder, run.info.run_id, info | {"stored_bytes": stored})
