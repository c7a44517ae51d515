"""The defaults a user's model folder sets, applied to what the config leaves unset, and checked against the data.

``tasks/techniques/models/folder_defaults.py`` reads the folder; this module decides which of its values
apply (a value the config sets always wins), passes the text ones to the data stage (the token length also
depends on the data), and after the data stage checks that a head used as it is (``train.epochs: 0``)
predicts the data's classes. Every derived value is logged as a ``derived.*`` param and shown in one line.
"""

from __future__ import annotations

from optforge.flows.params import ConfigError, PipelineConfig
from optforge.tasks.techniques.data.data import source_kind
from optforge.tasks.techniques.models.folder_defaults import (
    Derived,
    image_defaults,
    model_classes,
    position_limit,
)
from optforge.tasks.techniques.models.models import HUGGINGFACE, read_hf_config


def folder_config(cfg: PipelineConfig) -> dict | None:
    """The Hugging Face model folder's config.json, or None for any other model."""
    return read_hf_config(cfg.model.path) if cfg.model.arch == HUGGINGFACE and cfg.model.path else None


def apply_folder_defaults(cfg: PipelineConfig) -> tuple[PipelineConfig, list[Derived]]:
    """``cfg`` with the image settings the folder's processor and config give for the fields it leaves unset."""
    hf = folder_config(cfg)
    if hf is None or source_kind(cfg.data) != "image":
        return cfg, []
    derived = [d for d in image_defaults(cfg.model.path, hf) if d.field.split(".", 1)[1] not in cfg.data.model_fields_set]
    data = cfg.data.model_copy(update={d.field.split(".", 1)[1]: d.value for d in derived})
    return cfg.model_copy(update={"data": data}), derived


def text_limits(cfg: PipelineConfig) -> dict:
    """What the data stage takes from the folder: the most tokens the model takes, and the head's class order."""
    hf = folder_config(cfg)
    limit = position_limit(hf)
    return {"max_positions": limit[0] if limit else None, "model_classes": model_classes(hf)}


def derived_length(cfg: PipelineConfig, contract) -> list[Derived]:
    """The token length the data stage settled on, when the config left it unset."""
    if contract.kind != "text" or cfg.data.max_length is not None:
        return []
    return [Derived("data.max_length", contract.sequence_length, contract.preprocessing.get("max_length_from", ""))]


def check_head(cfg: PipelineConfig, contract) -> None:
    """With ``train.epochs: 0`` a Hugging Face head is used as it is: it must predict the data's classes, by count
    and, where both have names, by name and order. Fails before anything trains, showing both lists."""
    hf = folder_config(cfg)
    if hf is None or cfg.train.epochs > 0:
        return
    names = model_classes(hf)
    count = hf.get("num_labels") or len(hf.get("id2label") or {}) or 2
    data_names = contract.preprocessing.get("labels")
    if count != contract.num_classes or (names and data_names and list(names) != list(data_names)):
        raise ConfigError(f"model.path: with train.epochs: 0 the model's head is used as it is, but it predicts "
                          f"{count} classes {names or ''} and the data has {contract.num_classes} "
                          f"{list(data_names) if data_names else ''}; give data with the head's classes (data.classes "
                          "sets their order), or fine-tune (train.epochs > 0) to train a new head")


def summary_line(derived: list[Derived]) -> str:
    return "from the model folder: " + "; ".join(f"{d.field}={d.value} ({d.why})" for d in derived)
