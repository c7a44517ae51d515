"""Where a model can be cut into blocks for early exits, and the exit head that fits each family.

A model is seen as ``final(block_n(... block_0(prepare(inputs))))``, with every block taking the running
state ``h`` plus extras that stay the same through the blocks (a transformer's attention mask). The
modules are the model's own, so the cut model computes exactly what the model computes. Explicit
dispatch on the class: the zoo MLP (a block per hidden layer), the zoo CNN and DSCNN (a block per conv
block, a separable block kept whole), and Hugging Face encoder classifiers (embeddings, then a block per
encoder layer; the head is BERT's pooler and classifier, DistilBERT's, or RoBERTa's and ELECTRA's head module).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from optforge.tasks.techniques.models.models import DSCNN, MLP, SmallCNN


@dataclass
class Blocks:
    """A model cut into blocks; ``head(width, num_classes)`` builds an exit head for a block ``width`` wide."""

    prepare: Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, ...]]  # inputs -> (h, *extras)
    blocks: list[Callable[..., torch.Tensor]]  # (h, *extras) -> h
    final: Callable[[torch.Tensor], torch.Tensor]  # the model's own head: h -> logits
    head: Callable[[int, int], nn.Module]


def _only(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    (x,) = inputs.values()  # the zoo models take one input, whatever the contract calls it
    return x


def _rows(inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor]:
    return (_only(inputs).flatten(1),)


def _images(inputs: dict[str, torch.Tensor], shape: tuple[int, ...]) -> tuple[torch.Tensor]:
    return (_only(inputs).reshape(-1, *shape),)


def _linear_head(width: int, num_classes: int) -> nn.Module:
    return nn.Linear(width, num_classes)


def _pooled_head(width: int, num_classes: int) -> nn.Module:
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))


class _Plain(nn.Module):
    """A block that ignores the extras (the zoo models have none)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, h: torch.Tensor, *extras: torch.Tensor) -> torch.Tensor:
        return self.block(h)


def _zoo(model: nn.Module) -> Blocks | None:
    if isinstance(model, MLP):  # net = [Linear, ReLU, Dropout] per hidden layer, then the head Linear
        net = model.net
        return Blocks(_rows, [_Plain(net[i:i + 3]) for i in range(0, len(net) - 1, 3)], net[-1], _linear_head)
    if isinstance(model, (SmallCNN, DSCNN)):
        # A block ends at each ReLU (or the max-pool after it), except inside a separable block (depthwise
        # conv, then pointwise): a head between the two would see half a block.
        layers, cuts, conv = list(model.features), [], None
        for i, layer in enumerate(layers):
            conv = layer if isinstance(layer, nn.Conv2d) else conv
            nxt = layers[i + 1] if i + 1 < len(layers) else None
            if isinstance(layer, nn.ReLU) and not isinstance(nxt, nn.MaxPool2d) and conv.groups == 1 \
                    or isinstance(layer, nn.MaxPool2d):
                cuts.append(i + 1)
        blocks = [_Plain(nn.Sequential(*layers[a:b])) for a, b in zip([0, *cuts[:-1]], cuts)]
        return Blocks(partial(_images, shape=tuple(model.image_shape)), blocks, model.head, _pooled_head)
    return None


class _BertLayer(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = self.layer(h, attention_mask=mask)
        return out[0] if isinstance(out, tuple) else out


class _ClsHead(nn.Module):
    """BERT's head shape on the [CLS] position: dense + tanh (the pooler), then a classifier."""

    def __init__(self, width: int, num_classes: int):
        super().__init__()
        self.pooler, self.classifier = nn.Linear(width, width), nn.Linear(width, num_classes)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.tanh(self.pooler(h[:, 0])))


class _DistilHead(nn.Module):
    """DistilBERT's head on the [CLS] position: pre_classifier + ReLU, then a classifier."""

    def __init__(self, pre: nn.Linear, classifier: nn.Linear):
        super().__init__()
        self.pre_classifier, self.classifier = copy.deepcopy(pre), copy.deepcopy(classifier)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.relu(self.pre_classifier(h[:, 0])))


def _encoder_layers(base: nn.Module) -> nn.ModuleList | None:
    """The layer list of an encoder: ``encoder.layer`` (BERT, RoBERTa, XLM-R, ELECTRA) or DistilBERT's
    ``transformer.layer``. (DeBERTa and MPNet layers also need the encoder's relative positions: not these.)"""
    for holder in ("encoder", "transformer"):
        layers = getattr(getattr(base, holder, None), "layer", None)
        if isinstance(layers, nn.ModuleList) and not hasattr(getattr(base, holder), "rel_embeddings") \
                and not hasattr(getattr(base, holder), "relative_attention_bias"):
            return layers
    return None


def _bert(model: nn.Module) -> Blocks | None:
    """An encoder classifier whose layers take (hidden states, additive mask): base_model.embeddings, its
    layer list (``_encoder_layers``), and one of three heads: BERT's pooler + Linear classifier, DistilBERT's
    pre_classifier + classifier, or a classification-head module that reads the [CLS] state itself (RoBERTa,
    XLM-R, ELECTRA). An exit head starts as a copy of the model's own head."""
    base = getattr(model, "base_model", None)
    layers = _encoder_layers(base)
    classifier = getattr(model, "classifier", None)
    if layers is None or not hasattr(base, "embeddings") or classifier is None \
            or getattr(model.config, "is_decoder", False):
        return None
    pooler, project = getattr(base, "pooler", None), getattr(base, "embeddings_project", None)  # ELECTRA projects
    distil = isinstance(getattr(model, "pre_classifier", None), nn.Linear)

    def prepare(inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if distil:
            h = base.embeddings(inputs["input_ids"])
        else:
            h = base.embeddings(input_ids=inputs["input_ids"], token_type_ids=inputs.get("token_type_ids"))
        h = project(h) if project is not None else h
        keep = inputs.get("attention_mask")
        keep = torch.ones(h.shape[:2], dtype=h.dtype) if keep is None else keep.to(h.dtype)
        # The additive 4-D mask that both eager and SDPA attention add to their scores.
        return h, (1.0 - keep[:, None, None, :]) * torch.finfo(h.dtype).min

    if pooler is not None and isinstance(classifier, nn.Linear):  # BERT
        def final(h: torch.Tensor) -> torch.Tensor:
            return model.classifier(model.dropout(base.pooler(h)))

        def head(width: int, num_classes: int) -> nn.Module:
            exit_head = _ClsHead(width, num_classes)
            exit_head.load_state_dict({"pooler.weight": base.pooler.dense.weight, "pooler.bias": base.pooler.dense.bias,
                                       "classifier.weight": classifier.weight, "classifier.bias": classifier.bias})
            return exit_head  # starts as the model's own head, which already reads a [CLS] state
    elif distil:
        def final(h: torch.Tensor) -> torch.Tensor:
            return model.classifier(model.dropout(torch.relu(model.pre_classifier(h[:, 0]))))

        def head(width: int, num_classes: int) -> nn.Module:
            return _DistilHead(model.pre_classifier, classifier)
    elif not isinstance(classifier, nn.Linear):  # a head module over the sequence (RoBERTa, ELECTRA)
        def final(h: torch.Tensor) -> torch.Tensor:
            return classifier(h)

        def head(width: int, num_classes: int) -> nn.Module:
            return copy.deepcopy(classifier)
    else:
        return None
    return Blocks(prepare, [_BertLayer(layer) for layer in layers], final, head)


def blocks_of(model: nn.Module) -> Blocks:
    """The block structure of ``model``.

    Raises:
        ValueError: neither a zoo MLP or CNN nor a BERT-style Hugging Face encoder classifier.
    """
    found = _zoo(model) or _bert(model)
    if found is None:
        raise ValueError(f"early_exit: cannot see blocks in a {type(model).__name__}; exit heads go on the zoo MLP, "
                         "CNN and DSCNN and on Hugging Face encoder classifiers whose layers take the hidden states "
                         "and a mask (BERT, DistilBERT, RoBERTa, XLM-R, ELECTRA); others (DeBERTa, MPNet, ALBERT, "
                         "vision models) and factory models: not yet")
    return found
