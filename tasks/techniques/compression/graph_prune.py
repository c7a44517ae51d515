"""Structured pruning of any PyTorch model through torch-pruning's dependency graph.

The hand-written walk in ``prune.py`` knows the zoo's straight MLP/CNN stacks only. Real models couple
their widths: a ResNet's residual additions tie the channels of every block in a stage, a transformer's
attention heads span the query, key and value projections and the output projection. torch-pruning
(a maintained library whose own examples prune Hugging Face and timm models) traces the model once with
example inputs and removes each coupled group of channels together, so the result is a smaller dense
model that still runs. We keep:

- the classification head's outputs (one per class) and, for transformers, the embeddings, so the
  residual stream (``hidden_size``) keeps its width: heads and feed-forward neurons are what shrink;
- head dimensions: a transformer loses whole heads (``prune_num_heads``), never part of every head.

A pruned model no longer matches any config (a Hugging Face config has one head count for every layer),
so it is rebuilt by building the original architecture and replaying the recorded *pruning history*
(which channels each layer lost) before loading the weights: ``replay``. The history is plain JSON.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from optforge.tasks.techniques.contract import InputContract, forward_logits

History = list[list[Any]]  # torch-pruning's [[module name, pruned outputs?, [channel indices]], ...]


@dataclass(frozen=True)
class Layout:
    """Where a family's self-attention keeps its projections and its head count and size: pruning removes whole
    heads from the projections, then sets the count (and any width attribute) the forward reshapes with."""

    projections: tuple[str, str, str]
    heads: str
    head_size: str
    widths: tuple[str, ...] = ()  # attributes that hold heads x head size


# Explicit table of the Hugging Face layouts (transformers 5): BERT, RoBERTa, XLM-R, ELECTRA, ALBERT, MobileBERT;
# DistilBERT; DeBERTa; MPNet; ViT, DeiT and the q_proj families. A block that matches none is not head-pruned.
LAYOUTS = (
    Layout(("query", "key", "value"), "num_attention_heads", "attention_head_size", ("all_head_size",)),
    Layout(("q_lin", "k_lin", "v_lin"), "n_heads", "attention_head_size", ("dim",)),
    Layout(("query_proj", "key_proj", "value_proj"), "num_attention_heads", "attention_head_size", ("all_head_size",)),
    Layout(("q", "k", "v"), "num_attention_heads", "attention_head_size", ("all_head_size",)),
    Layout(("q_proj", "k_proj", "v_proj"), "num_attention_heads", "head_dim"),
    Layout(("q_proj", "k_proj", "v_proj"), "num_heads", "head_dim"),
)


def attention_modules(model: nn.Module) -> list[tuple[nn.Module, Layout]]:
    """Self-attention blocks and their layout: three projection Linears, a head count and a head size."""
    found = []
    for m in model.modules():
        layout = next((lay for lay in LAYOUTS if hasattr(m, lay.heads) and hasattr(m, lay.head_size)
                       and all(isinstance(getattr(m, a, None), nn.Linear) for a in lay.projections)), None)
        if layout is not None:
            found.append((m, layout))
    return found


# Linears that compute several things in one output (ModernBERT's fused query/key/value and gated input): the
# dependency graph cannot tell their parts apart, so they keep their width.
FUSED_PROJECTIONS = frozenset({"Wqkv", "Wi", "qkv", "in_proj"})


def kept_layers(model: nn.Module, num_classes: int) -> list[nn.Module]:
    """Modules whose output width must not change: the head (``num_classes`` outputs), embeddings, and fused
    projections."""
    head = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == num_classes]
    named = [m for name, m in model.named_modules() if name.rsplit(".", 1)[-1] in {"embeddings", *FUSED_PROJECTIONS}]
    return head + named


def widths(model: nn.Module) -> dict[str, int]:
    """Output width of every Linear and Conv2d layer, by module name: what a pruning report compares."""
    return {name: m.out_features if isinstance(m, nn.Linear) else m.out_channels
            for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def _sync_attention(model: nn.Module) -> None:
    """Tell each attention block how many heads it kept (head size is never pruned)."""
    for attn, layout in attention_modules(model):
        width = getattr(attn, layout.projections[0]).out_features
        setattr(attn, layout.heads, width // getattr(attn, layout.head_size))
        for name in layout.widths:
            if hasattr(attn, name):
                setattr(attn, name, width)


def _graph_args(contract: InputContract) -> dict:
    """How torch-pruning traces a model: the contract's example batch, passed the way ``forward_logits`` does."""
    return {"example_inputs": contract.example(batch=2), "forward_fn": forward_logits}


def too_narrow(model: nn.Module, ratio: float, min_units: int) -> list[nn.Module]:
    """Linear/Conv2d layers that would keep fewer than ``min_units`` outputs after removing ``ratio`` of them."""
    width = {nn.Linear: "out_features", nn.Conv2d: "out_channels"}
    return [m for m in model.modules() if type(m) in width and getattr(m, width[type(m)]) * (1 - ratio) < min_units]


def prune_channels(model: nn.Module, contract: InputContract, ratio: float, p: int = 2,
                   min_units: int = 1) -> tuple[nn.Module, History]:
    """Remove ``ratio`` of every prunable group's channels (and of each attention block's heads) in place,
    lowest ``p``-norm first, leaving whole any layer that would keep fewer than ``min_units`` outputs;
    returns the model and this step's pruning history."""
    import torch_pruning as tp

    if ratio <= 0:
        return model, []
    heads = {}
    for attn, layout in attention_modules(model):
        heads.update({getattr(attn, name): getattr(attn, layout.heads) for name in layout.projections})
    was_training = model.training
    model.eval()
    ignored = kept_layers(model, contract.num_classes) + too_narrow(model, ratio, min_units)
    pruner = tp.pruner.MetaPruner(
        model, importance=tp.importance.MagnitudeImportance(p=p), pruning_ratio=ratio, ignored_layers=ignored,
        num_heads=heads, prune_num_heads=bool(heads), prune_head_dims=False, head_pruning_ratio=ratio, **_graph_args(contract))
    pruner.step()
    _sync_attention(model)
    model.train(was_training)
    return model, pruner.pruning_history()


def replay(model: nn.Module, contract: InputContract, history: History) -> nn.Module:
    """Apply a recorded pruning ``history`` to a freshly built ``model`` (same architecture), so that the
    pruned model's ``state_dict`` loads into it."""
    import torch_pruning as tp

    names = dict(model.named_modules())
    missing = sorted({step[0] for step in history} - set(names))
    if missing:
        raise ValueError(f"model spec: the pruning history names layers this architecture lacks: {missing[:5]}")
    graph = tp.DependencyGraph().build_dependency(model.eval(), **_graph_args(contract))
    graph.load_pruning_history(history)
    _sync_attention(model)
    return model

