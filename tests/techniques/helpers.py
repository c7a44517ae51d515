"""Builders that turn the tests' toy arrays into the input contract's shapes.

The techniques take data as ``Part``s (named input arrays plus labels) and models as ``ModelSpec``s
carrying a contract; the tests' data are float tables, so everything here is the ``table`` kind with
its one input ``input``. Import as ``from tests.techniques.helpers import ...``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from optforge.tasks.techniques.contract import table_contract
from optforge.tasks.techniques.data.data import Part
from optforge.tasks.techniques.models.models import ModelSpec

INPUT = "input"  # the one input of a table contract


def rows(X) -> dict[str, np.ndarray]:
    """A batch of float rows as the named inputs of a table contract."""
    return {INPUT: np.ascontiguousarray(X, dtype=np.float32)}


def table_part(X, y=None) -> Part:
    """A ``Part`` of float rows ``X`` and labels ``y`` (zeros when the test only needs outputs)."""
    X = np.ascontiguousarray(X, dtype=np.float32)
    y = np.zeros(len(X), np.int64) if y is None else np.asarray(y, np.int64)
    return Part(rows(X), y)


def table_spec(config: dict, num_features: int, num_classes: int, image_shape=None,
               factorized: dict[str, int] | None = None) -> ModelSpec:
    """A ``ModelSpec`` for ``num_features``-wide rows and ``num_classes`` classes (what the old spec held)."""
    return ModelSpec(config, table_contract(num_features, num_classes, image_shape).to_dict(),
                     transforms=[("factorize", {"ranks": factorized})] if factorized else ())


class TableRows(Dataset):
    """``({"input": x}, y)`` per row: what a DataLoader over a table split yields after collation."""

    def __init__(self, X, y):
        self.X, self.y = torch.as_tensor(np.asarray(X, np.float32)), torch.as_tensor(np.asarray(y))

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        return {INPUT: self.X[i]}, self.y[i]


def tiny_bert(layers: int = 2, hidden: int = 32, heads: int = 4, num_labels: int = 3):
    """A seeded BertForSequenceClassification of a few thousand weights (vocabulary 60, 32 positions), eval mode."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(
        vocab_size=60, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=2 * hidden, max_position_embeddings=32, num_labels=num_labels)).eval()


def tiny_resnet(num_labels: int = 10):
    """A seeded two-stage ResNetForImageClassification (16 and 32 channels, basic blocks), eval mode."""
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    return ResNetForImageClassification(ResNetConfig(
        num_channels=3, embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic",
        num_labels=num_labels)).eval()


def hf_spec(model, contract) -> ModelSpec:
    """The spec the pipeline keeps for a Hugging Face model: its config.json content and the data's contract."""
    from optforge.tasks.techniques.models.models import ModelConfig

    return ModelSpec(ModelConfig(arch="huggingface", path="unused").to_dict(), contract.to_dict(),
                     hf_config=model.config.to_dict())


def is_sharded(model) -> bool:
    """Whether ``model``'s parameters are FSDP2 shards (DTensors) rather than plain tensors."""
    return any(hasattr(p, "to_local") for p in model.parameters())
