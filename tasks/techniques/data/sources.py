"""Reading a data source with its adapter (table, image folder, text file) into the split folder every stage
reads (``data.py`` holds that folder's form; the adapters import it, and this module imports them)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from optforge.tasks.techniques.contract import table_contract
from optforge.tasks.techniques.data import images, tables, texts
from optforge.tasks.techniques.data.data import (
    DataConfig,
    Part,
    fingerprint,
    publish,
    source_kind,
    staging,
    write_meta,
    write_part,
)
from optforge.tasks.techniques.data.split import split_indices


def prepare(cfg: DataConfig, root: str | Path, tokenizer: str | None = None, max_positions: int | None = None,
            model_classes=None) -> Path:
    """Read ``cfg.source`` with its adapter and write the split folder ``<root>/<fingerprint>``.

    ``tokenizer`` (text only) is the folder to tokenize with when ``cfg.tokenizer`` is not set (the
    Hugging Face model folder's own); ``max_positions`` the most tokens the model takes; ``model_classes``
    a Hugging Face head's class order (kept when its names are the data's). Returns the folder.
    """
    root = Path(root)
    kind = source_kind(cfg)
    with staging(root) as tmp:
        if kind == "image":
            images.prepare_images(cfg, tmp, model_classes)
        elif kind == "text":
            texts.prepare_texts(cfg, tmp, cfg.tokenizer or tokenizer, max_positions, model_classes)
        else:
            _prepare_table(cfg, tmp)
        return publish(tmp, root / fingerprint(tmp))


def _prepare_table(cfg: DataConfig, tmp: Path) -> None:
    X, y = tables.read_table(cfg.source, cfg.label_column)
    image_shape = cfg.image_shape or ((1, 8, 8) if cfg.source == "digits" else None)
    if cfg.num_classes is not None and y.max() >= cfg.num_classes:
        raise ValueError(f"data.num_classes: labels must be in 0..{cfg.num_classes - 1}, found {int(y.max())} in {cfg.source}")
    if image_shape is not None and int(np.prod(image_shape)) != X.shape[1]:
        raise ValueError(f"data.image_shape: {list(image_shape)} holds {int(np.prod(image_shape))} values "
                         f"but {cfg.source} has {X.shape[1]} features per sample")
    num_classes = cfg.num_classes or int(y.max()) + 1
    new = None
    if cfg.new_source:
        new = tables.read_table(cfg.new_source, cfg.label_column, field="data.new_source")
        if new[0].shape[1] != X.shape[1]:
            raise ValueError(f"data.new_source: {cfg.new_source} has {new[0].shape[1]} features per sample, "
                             f"but data.source has {X.shape[1]}")
    parts = tables.split_table(X, y, cfg, new, num_classes)
    for name, (Xp, yp) in parts.items():
        write_part(tmp / name, Part({"input": Xp}, yp))
    # The test split holds data.source's rows, then data.new_source's: how many are new, to score them apart.
    stats = {"test_new_rows": len(split_indices(len(new[0]), cfg, "data.new_source")[2])} if new else {}
    write_meta(tmp, table_contract(X.shape[1], num_classes, image_shape), stats)
