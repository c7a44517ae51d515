"""Hugging Face models from a local ``save_pretrained`` folder: loaded with local files only, safetensors only.

The Auto class follows the data: text -> ``AutoModelForSequenceClassification``, images ->
``AutoModelForImageClassification``. A saved variant keeps the model's ``config.json`` content in its
spec, and ``from_config`` rebuilds the architecture from it (weights then load from the variant's
state_dict), so nothing reaches for the Hub or for the original folder.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from torch import nn

from optforge.tasks.techniques.contract import InputContract

log = logging.getLogger(__name__)
FIELD = "model.path"
CONVERT_HINT = ("convert it once where you trust the file: python -c \"from transformers import AutoModel; "
                "AutoModel.from_pretrained('{p}').save_pretrained('{p}', safe_serialization=True)\" "
                "(use the AutoModelFor... class it was saved with)")


def _auto_class(contract: InputContract):
    import transformers

    if contract.kind == "text":
        return transformers.AutoModelForSequenceClassification
    if contract.kind == "image":
        return transformers.AutoModelForImageClassification
    raise ValueError(f"model.arch: a Hugging Face model needs text or image data, but this data is a {contract.kind} "
                     f"with inputs {list(contract.names)}")


def check_folder(folder: str | Path) -> Path:
    """The folder, when it holds config.json and safetensors weights; clear errors otherwise."""
    path = Path(folder)
    if not path.is_dir():
        raise FileNotFoundError(f"{FIELD}: Hugging Face model folder not found: {path}")
    if not (path / "config.json").is_file():
        raise ValueError(f"{FIELD}: {path} has no config.json; expected a folder written by save_pretrained")
    if not any(path.glob("*.safetensors")):
        pickled = sorted(p.name for p in path.glob("*.bin"))
        if pickled:
            raise ValueError(f"{FIELD}: {path} holds only pickled weights {pickled}; optforge loads safetensors only "
                             "(a pickle can run code when loaded): " + CONVERT_HINT.format(p=path))
        raise ValueError(f"{FIELD}: {path} has no *.safetensors weights")
    return path


def load_pretrained(folder: str | Path, contract: InputContract, new_head: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """(model in eval mode, its config as a dict) from a local folder. The head must fit the data's classes,
    unless ``new_head`` (fine-tuning): then a head of another size is replaced by a fresh one for the data's
    classes, and the log says so. ``id2label`` takes the data's class names, so a saved model names its outputs."""
    path = check_folder(folder)
    auto = _auto_class(contract)
    raw = json.loads((path / "config.json").read_text())
    heads = raw.get("num_labels") or len(raw.get("id2label") or {}) or 2  # transformers' default head has 2
    replace_head = new_head and heads != contract.num_classes
    extra = {"num_labels": contract.num_classes, "ignore_mismatched_sizes": True} if replace_head else {}
    try:
        model = auto.from_pretrained(str(path), local_files_only=True, use_safetensors=True, **extra)
    except Exception as exc:
        raise ValueError(f"{FIELD}: cannot load {path} with {auto.__name__} ({type(exc).__name__}: {exc})") from exc
    if model.config.num_labels != contract.num_classes:
        raise ValueError(f"{FIELD}: {path} predicts {model.config.num_labels} labels but the data has "
                         f"{contract.num_classes} classes (data.source, data.num_classes); with train.epochs: 0 the "
                         "head is used as it is: fine-tune (train.epochs > 0) to give it a new head")
    if replace_head:
        log.warning("%s: its head predicts %d classes, the data has %d: fine-tuning starts a new head", path, heads,
                    contract.num_classes)
    names = contract.preprocessing.get("labels")
    if names and len(names) == contract.num_classes:
        model.config.id2label = {i: str(n) for i, n in enumerate(names)}
        model.config.label2id = {str(n): i for i, n in enumerate(names)}
    return model.eval(), to_dict(model)


def to_dict(model: nn.Module) -> dict[str, Any]:
    return model.config.to_dict()


def from_config(hf_config: dict[str, Any], contract: InputContract) -> nn.Module:
    """An untrained model of the architecture ``hf_config`` describes (config.json content)."""
    from transformers import AutoConfig

    if not hf_config.get("model_type"):
        raise ValueError("model spec: a Hugging Face model's spec lacks its config (model_type)")
    raw = dict(hf_config)
    config = AutoConfig.for_model(raw.pop("model_type"), **raw)
    return _auto_class(contract).from_config(config)
