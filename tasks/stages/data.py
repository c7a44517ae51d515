"""Prefect task: read, validate and split the dataset; log its fingerprint with ``mlflow.log_input``."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np

from optforge.tasks.runtime.caching import stage_task
from optforge.tasks.runtime.refs import DataRef
from optforge.tasks.runtime.tracking import child_run
from optforge.tasks.techniques.data.data import DataConfig, data_name, load_splits
from optforge.tasks.techniques.data.sources import prepare

# Rows of each split handed to mlflow.data as a schema sample: the fingerprint covers the whole split.
SCHEMA_ROWS = 8


@stage_task("prepare_data")
def prepare_data(cfg: DataConfig, source_sha256: str | None, workdir: str, parent_run_id: str | None,
                 new_source_sha256: str | None = None, tokenizer: str | None = None,
                 tokenizer_sha256: str | None = None, max_positions: int | None = None,
                 model_classes: list[str] | None = None) -> DataRef:
    """Split ``cfg.source`` into ``<workdir>/data/<fingerprint>/`` (a split folder, see tasks.techniques.data.data).

    ``source_sha256`` (the user file's or folder's content hash, None for the built-in dataset) is here
    only so that the cache key changes when the content does; likewise ``new_source_sha256`` and
    ``tokenizer_sha256``. ``tokenizer`` is the folder text is tokenized with when ``cfg.tokenizer`` is
    unset (the Hugging Face model folder's own); ``max_positions`` and ``model_classes`` what that folder says
    about its inputs (``tasks.techniques.models.folder_defaults``).
    """
    with child_run(parent_run_id, "prepare_data", params={"data": cfg.to_dict()}) as run:
        folder = prepare(cfg, Path(workdir).resolve() / "data", tokenizer, max_positions, model_classes)
        digest = folder.name
        splits = load_splits(folder)
        sizes = {"train": len(splits.train), "val": len(splits.val), "test": len(splits.test),
                 **({"new_train": len(splits.new)} if cfg.new_source else {})}
        name = data_name(cfg)
        for context, part in {"training": splits.train, "validation": splits.val, "testing": splits.test}.items():
            sample = part.head(SCHEMA_ROWS)
            features = {k: np.asarray(v) for k, v in sample.inputs.items()}
            features = next(iter(features.values())) if len(features) == 1 else features
            dataset = mlflow.data.from_numpy(features, targets=np.asarray(sample.labels), source=str(cfg.source),
                                             name=f"{name}-{context}", digest=digest)
            mlflow.log_input(dataset, context=context)
        mlflow.log_metrics({f"samples_{k}": v for k, v in sizes.items()} | {"num_classes": splits.num_classes}
                           | {k: float(v) for k, v in splits.stats.items()})
        mlflow.set_tags({"optforge.data_fingerprint": digest, "optforge.data_kind": splits.contract.kind,
                         "optforge.inputs": ",".join(splits.contract.names)})
        mlflow.log_dict(splits.contract.to_dict(), "contract.json")
        if splits.stats.get("texts_truncated"):
            mlflow.set_tag("optforge.note", f"{splits.stats['texts_truncated']} of {splits.stats['texts']} texts were "
                           f"longer than data.max_length={splits.contract.sequence_length} tokens and were truncated")
    return DataRef(str(folder), digest, splits.contract.to_dict(), name, sizes, run.info.run_id)
