"""Prefect task: the FP32 baseline: a given model taken as is, or trained / fine-tuned on Ray Train.

The model comes from ``model`` (zoo, factory, Hugging Face folder, weights file) and, optionally,
``train.init_from``. With ``train.epochs: 0`` the given model *is* the baseline: nothing is trained,
its validation accuracy is measured and it is saved as a model folder like any trained one. With
epochs > 0 training starts from its weights on Ray Train, with every strategy.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import mlflow
import numpy as np

from optforge.tasks.runtime.caching import stage_dir, stage_task
from optforge.tasks.runtime.refs import DataRef, Format, ModelRef, file_sha256
from optforge.tasks.runtime.tracking import child_run, tracking_uri
from optforge.tasks.techniques.compression.distill import DistillConfig, teacher_logits
from optforge.tasks.techniques.data.data import load_splits
from optforge.tasks.techniques.files import atomic_write
from optforge.tasks.techniques.measurement.flops import count_flops
from optforge.tasks.techniques.models.init_weights import load_init_state
from optforge.tasks.techniques.models.model_source import starting_model
from optforge.tasks.techniques.models.models import ModelConfig, count_params, save_model
from optforge.tasks.techniques.models.rebuild import load_model
from optforge.tasks.techniques.training.training import TrainConfig, evaluate
from optforge.tasks.workers.training_driver import run_training
from optforge.tasks.workers.worker_common import KdConfig, WorkerConfig

# Whole-run figures the strategies report beside the per-epoch curves.
STRATEGY_METRICS = ("staleness_mean", "staleness_max", "stale_dropped", "workers_lost", "updates",
                    "averaging_rounds")


@stage_task("train")
def train(cfg: TrainConfig, model_cfg: ModelConfig, data: DataRef, workdir: str, parent_run_id: str | None,
          init: ModelRef | None = None, model_sha256: str | None = None) -> ModelRef:
    """The FP32 baseline ("pytorch_fp32"): a reference to its model folder.

    ``init`` (from ``resolve_init``) is the model ``train.init_from`` points at; training starts from its
    weights. Its content hash is part of the cache key, so a moved alias means a new training;
    ``model_sha256`` (of ``model.path`` / ``model.weights``) does the same for a user's model files.
    """
    key = {"train": cfg, "model": model_cfg, "data": data, **({"init": init} if init else {})}
    out = stage_dir(workdir, "train", key)
    tags = {"optforge.strategy": cfg.strategy if cfg.epochs else "none (train.epochs=0)",
            **({"optforge.init_from": init.info["init_from"], "optforge.init_resolved": init.info["resolved"]}
               if init else {})}
    with child_run(parent_run_id, "train", params={"train": cfg.to_dict(), "model": model_cfg.to_dict()},
                   tags=tags, system_metrics=True) as run:
        contract = data.inputs
        # Build or load once here so a bad factory, folder or shape fails in seconds, before Ray starts workers.
        model, spec, pretrained = starting_model(model_cfg, contract, fine_tune=cfg.epochs > 0)
        if init:
            model.load_state_dict(load_init_state(init.path, spec, cfg.init_from))  # shapes checked first
        params, flops = count_params(model), count_flops(model, contract)
        mlflow.log_params({"params": params, "flops": flops})
        if cfg.epochs == 0:
            summary = _take_as_is(model, spec, data, out / "model")
        else:
            start = init.path if init else (str(save_model(model, spec, out / "start")) if pretrained else None)
            storage = Path(cfg.storage_path or Path(workdir) / "ray").resolve()
            kd = _kl_to_original(cfg, model, data, out) if init and cfg.kl_weight else None
            worker = WorkerConfig(cfg.to_dict(), asdict(spec), data.path, tracking_uri(), run.info.run_id,
                                  init_path=start, kd=kd)
            summary = run_training(worker, storage, name=f"train-{out.name}", out_dir=out / "model")
            strategy_stats = {k: v for k, v in summary.get("metrics", {}).items() if k in STRATEGY_METRICS}
            if strategy_stats:
                mlflow.log_metrics(strategy_stats)
            mlflow.set_tag("optforge.resumed_from_checkpoint", str(summary["resumed"]).lower())
        mlflow.log_metrics({k: summary[k] for k in ("best_val_accuracy", "best_epoch", "epochs_run")})
        if init:
            _log_old_and_new(model, out / "model", data)
        mlflow.log_artifacts(str(out / "model"), "model")
        if spec.hf_config is not None and cfg.epochs > 0:
            mlflow.log_artifacts(str(_save_pretrained(out / "model", model_cfg.path, data, out / "hf_model")), "hf_model")
    info = {"params": params, "flops": flops, "best_val_accuracy": summary["best_val_accuracy"],
            "epochs_run": summary["epochs_run"]}
    return ModelRef("pytorch_fp32", Format.TORCH, str(out / "model"), file_sha256(out / "model"), run.info.run_id, info)


def _save_pretrained(trained: Path, source: str | None, data: DataRef, folder: Path) -> Path:
    """The fine-tuned Hugging Face model as a ``save_pretrained`` folder that transformers reloads as it reloads
    the user's own: the weights, its config (``id2label`` named by the data's classes), the tokenizer the data
    was tokenized with, or the image processor of the folder it came from."""
    import shutil

    model, _ = load_model(trained)
    model.save_pretrained(str(folder))
    tokenizer = Path(data.path) / "tokenizer"
    if tokenizer.is_dir():
        shutil.copytree(tokenizer, folder, dirs_exist_ok=True)
    processor = Path(source or "") / "preprocessor_config.json"
    if source and processor.is_file():
        shutil.copy2(processor, folder / processor.name)
    return folder


def _take_as_is(model, spec, data: DataRef, folder: Path) -> dict:
    """``train.epochs: 0``: save the given model as the baseline and measure it on the validation split."""
    val = evaluate(model, load_splits(data.path).val)
    save_model(model, spec, folder)
    mlflow.log_metrics({"val_accuracy": val["accuracy"], "val_loss": val["loss"]})
    mlflow.set_tag("optforge.note", "train.epochs=0: the given model is the FP32 baseline, not trained here")
    return {"best_val_accuracy": val["accuracy"], "best_epoch": -1, "epochs_run": 0, "resumed": False}


def _kl_to_original(cfg: TrainConfig, original, data: DataRef, out: Path) -> KdConfig:
    """Scene adaptation's regulariser: the original model's logits on the fit rows, computed once, as soft
    targets at temperature 1 with weight ``kl_weight`` (the distillation loss, the original as teacher)."""
    logits = teacher_logits(original, load_splits(data.path).fit)
    path = atomic_write(out / "original_logits.npz", lambda tmp: np.savez(tmp, train=logits), suffix=".npz")
    return KdConfig(DistillConfig(alpha=cfg.kl_weight, temperature=1.0).to_dict(), str(path), None)


def _log_old_and_new(original, trained_folder: Path, data: DataRef) -> None:
    """Test accuracy on data.source's rows and on data.new_source's rows, before and after fine-tuning."""
    parts = load_splits(data.path).test_by_source()
    if not parts:
        return
    trained, _ = load_model(trained_folder)
    mlflow.log_metrics({f"test_accuracy_{source}_{when}": evaluate(net, part)["accuracy"]
                        for source, part in parts.items() for when, net in (("before", original), ("after", trained))})
