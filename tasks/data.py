"""Prefect task: load, validate and split the dataset; log its fingerprint with ``mlflow.log_input``."""

from __future__ import annotations

from pathlib import Path

import mlflow

from tasks.caching import stage_task
from tasks.refs import DataRef
from tasks.techniques.data import DataConfig, fingerprint, load_arrays, load_new_arrays, save_splits, split
from tasks.tracking import child_run


@stage_task("prepare_data")
def prepare_data(cfg: DataConfig, source_sha256: str | None, workdir: str, parent_run_id: str | None,
                 new_source_sha256: str | None = None) -> DataRef:
    """Split ``cfg.source`` into train/val/test under ``<workdir>/data/<fingerprint>/``.

    ``source_sha256`` (the user file's content hash, None for the built-in dataset) is here only so
    that the cache key changes when the file's content does; ``new_source_sha256`` likewise for
    ``cfg.new_source``.
    """
    with child_run(parent_run_id, "prepare_data", params={"data": cfg.to_dict()}) as run:
        X, y, image_shape = load_arrays(cfg)
        new = load_new_arrays(cfg, X.shape[1]) if cfg.new_source else None
        splits = split(X, y, image_shape, cfg, new)
        digest = fingerprint(splits)
        path = save_splits(splits, Path(workdir).resolve() / "data" / digest / "splits.npz")
        sizes = {"train": len(splits.y_train), "val": len(splits.y_val), "test": len(splits.y_test),
                 **({"new_train": len(splits.y_new)} if cfg.new_source else {})}
        for context, (features, targets) in {
            "training": (splits.X_train, splits.y_train), "validation": (splits.X_val, splits.y_val),
            "testing": (splits.X_test, splits.y_test),
        }.items():
            dataset = mlflow.data.from_numpy(features, targets=targets, source=str(cfg.source), name=f"{Path(cfg.source).stem}-{context}", digest=digest)
            mlflow.log_input(dataset, context=context)
        mlflow.log_metrics({f"samples_{k}": v for k, v in sizes.items()} | {"num_classes": splits.num_classes})
        mlflow.set_tag("optforge.data_fingerprint", digest)
    return DataRef(str(path), digest, splits.num_features, splits.num_classes, image_shape, sizes, run.info.run_id)
