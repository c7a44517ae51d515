"""Prefect task: data-parallel training on Ray Train, tracked in a child MLflow run."""

from __future__ import annotations

from pathlib import Path

import mlflow

from tasks.caching import stage_dir, stage_task
from tasks.refs import DataRef, ModelRef, file_sha256
from tasks.techniques.flops import count_flops
from tasks.techniques.init_weights import load_init_state
from tasks.techniques.models import ModelConfig, ModelSpec, build_model, count_params
from tasks.techniques.training import TrainConfig
from tasks.tracking import child_run, tracking_uri
from tasks.train_worker import run_training

# Whole-run figures the strategies report beside the per-epoch curves.
STRATEGY_METRICS = ("staleness_mean", "staleness_max", "stale_dropped", "workers_lost", "updates",
                    "averaging_rounds")


@stage_task("train")
def train(cfg: TrainConfig, model_cfg: ModelConfig, data: DataRef, workdir: str, parent_run_id: str | None,
          init: ModelRef | None = None) -> ModelRef:
    """Train the FP32 baseline ("pytorch_fp32") and return a reference to its model folder.

    ``init`` (from ``resolve_init``) is the model ``train.init_from`` points at; training starts from its
    weights. Its content hash is part of the cache key, so a moved alias means a new training.
    """
    key = {"train": cfg, "model": model_cfg, "data": data, **({"init": init} if init else {})}
    out = stage_dir(workdir, "train", key)
    spec = ModelSpec(model_cfg.to_dict(), data.num_features, data.num_classes, data.image_shape)
    tags = {"optforge.strategy": cfg.strategy,
            **({"optforge.init_from": init.info["init_from"], "optforge.init_resolved": init.info["resolved"]}
               if init else {})}
    with child_run(parent_run_id, "train", params={"train": cfg.to_dict(), "model": model_cfg.to_dict()},
                   tags=tags) as run:
        # Build once here so a bad factory or shape fails in seconds, before Ray starts workers.
        fresh = build_model(spec)
        if init:
            load_init_state(init.path, spec, cfg.init_from)  # incompatible shapes: fail before Ray starts
        params, flops = count_params(fresh), count_flops(fresh, data.num_features)
        mlflow.log_params({"params": params, "flops": flops})
        storage = Path(cfg.storage_path or Path(workdir) / "ray").resolve()
        summary = run_training(
            cfg, spec, data.path, storage, name=f"train-{out.name}", out_dir=out / "model",
            mlflow_tracking_uri=tracking_uri(), mlflow_run_id=run.info.run_id,
            extra_config={"init_path": init.path} if init else None,
        )
        mlflow.log_metrics({k: summary[k] for k in ("best_val_accuracy", "best_epoch", "epochs_run")})
        strategy_stats = {k: v for k, v in summary.get("metrics", {}).items() if k in STRATEGY_METRICS}
        if strategy_stats:
            mlflow.log_metrics(strategy_stats)
        mlflow.set_tag("optforge.resumed_from_checkpoint", str(summary["resumed"]).lower())
        mlflow.log_artifacts(str(out / "model"), "model")
    info = {"params": params, "flops": flops, "best_val_accuracy": summary["best_val_accuracy"], "epochs_run": summary["epochs_run"]}
    return ModelRef("pytorch_fp32", "torch", str(out / "model"), file_sha256(out / "model"), run.info.run_id, info)
