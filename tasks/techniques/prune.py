"""Pruning: unstructured (zeroed weights) and structured (whole hidden units / channels removed).

Unstructured global magnitude pruning zeroes the smallest weights across all Linear/Conv2d layers
and is made permanent (``torch.nn.utils.prune.remove``). The tensors keep their shapes: dense
kernels (PyTorch, ONNX Runtime) do exactly the same work on zeros, so it saves nothing in latency or
file size unless a sparse kernel or a compressor is applied later. We report the sparsity and say so.

Structured pruning removes whole units: a hidden neuron of an MLP (a row of one Linear and the
matching column of the next) or a conv channel (filter, BatchNorm entry, depthwise filter and the
next layer's input channel). The layers become smaller dense layers, so latency really drops, and
the result is the same zoo architecture with smaller widths, rebuildable from its ``model.json``.
A unit's importance is its path norm: ||incoming weights|| x ||outgoing weights|| (L1 or L2), scaled
by the BatchNorm gains and depthwise filters it passes through, because a unit with large inputs
but near-zero outputs contributes nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
from pydantic import Field
from torch import nn
from torch.nn.utils import prune as torch_prune

from tasks.techniques.config import TechniqueConfig
from tasks.techniques.distill import FinetuneConfig
from tasks.techniques.flops import WEIGHTED
from tasks.techniques.models import LowRank, ModelConfig, ModelSpec, build_model

# Config field holding the prunable widths of each zoo architecture, in forward order.
WIDTH_FIELD = {"mlp": "hidden", "cnn": "channels", "dscnn": "channels"}
NEUTRAL = (nn.ReLU, nn.Dropout, nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.Flatten)


def _prune_finetune_default() -> FinetuneConfig:
    # Each round removes a share of every layer's units; a higher LR than factorization's re-balances the
    # survivors faster (on digits, 2 rounds, a pruned 128-64 student kept about 1 point more at 3e-3 than at 1e-3).
    return FinetuneConfig(lr=3e-3)


class PruneConfig(TechniqueConfig):
    """What to prune, how much, and the prune / fine-tune schedule."""

    method: Literal["structured", "unstructured"] = Field(
        "structured", description="structured: remove units/channels (faster); unstructured: zero weights (no speed-up)"
    )
    sparsity: float = Field(0.5, ge=0, lt=1, description="share of weights (unstructured) or of each layer's units "
                            "(structured) to remove, in [0, 1)")
    importance: Literal["l1", "l2"] = Field("l2", description="norm that scores a unit (structured)")
    rounds: int = Field(2, ge=1, le=20, description="prune-then-fine-tune rounds; each removes an equal share of what is left")
    min_units: int = Field(4, ge=1, description="never shrink a layer below this many units (structured)")
    finetune: FinetuneConfig = Field(default_factory=_prune_finetune_default, description="fine-tuning after each round")


@dataclass
class Group:
    """One prunable width: the layer producing the units, per-channel layers after it, the layer consuming them."""

    producer: str
    consumer: str
    followers: list[str] = field(default_factory=list)


def unit_groups(model: nn.Module) -> list[Group]:
    """The prunable widths of a zoo model, in forward order (one per entry of its width field)."""
    leaves = [(n, m) for n, m in model.named_modules() if not list(m.children())]
    groups: list[Group] = []
    current: Group | None = None
    for name, module in leaves:
        depthwise = isinstance(module, nn.Conv2d) and module.groups > 1
        if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)) or depthwise:
            if depthwise and module.groups != module.in_channels:
                raise ValueError(f"prune.method: grouped conv {name} is not depthwise; structured pruning cannot follow it")
            if current:
                current.followers.append(name)
        elif isinstance(module, WEIGHTED):
            if current:
                current.consumer = name
                groups.append(current)
            current = Group(producer=name, consumer="")
        elif not isinstance(module, NEUTRAL):
            raise ValueError(f"prune.method: structured pruning does not know layer {name} ({type(module).__name__})")
    return groups


def _norm(w: torch.Tensor, dim: int, p: int) -> torch.Tensor:
    """Per-unit norm along ``dim`` (all other dims reduced)."""
    w = w.detach().transpose(0, dim).reshape(w.shape[dim], -1)
    return w.abs().sum(1) if p == 1 else w.pow(2).sum(1).sqrt()


def importance(model: nn.Module, group: Group, p: int) -> torch.Tensor:
    """Path-norm score of each unit of ``group`` (module docstring)."""
    mods = dict(model.named_modules())
    score = _norm(mods[group.producer].weight, 0, p) * _norm(mods[group.consumer].weight, 1, p)
    for name in group.followers:
        m = mods[name]
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            score = score * (m.weight.detach().abs() / torch.sqrt(m.running_var + m.eps))
        else:  # depthwise conv: the unit's own filter
            score = score * _norm(m.weight, 0, p)
    return score


def _slice_state(state: dict, model: nn.Module, group: Group, keep: torch.Tensor) -> None:
    """Keep only units ``keep`` of ``group`` in ``state`` (tensor names as in ``model``)."""
    for name in [group.producer, *group.followers]:
        for key in ("weight", "bias", "running_mean", "running_var"):
            if f"{name}.{key}" in state:
                state[f"{name}.{key}"] = state[f"{name}.{key}"][keep].clone()
    state[f"{group.consumer}.weight"] = state[f"{group.consumer}.weight"][:, keep].clone()


def prune_structured(model: nn.Module, spec: ModelSpec, keep_fraction: float, cfg: PruneConfig) -> tuple[nn.Module, ModelSpec]:
    """Shrink every hidden width of ``model`` to ``keep_fraction`` of its current size, keeping the most important units.

    ``spec`` is the architecture ``model`` was built from; the result is a fresh model built from the
    returned spec (smaller widths) with the kept weights, so it is exactly what ``load_model`` rebuilds.
    """
    cfg_model = ModelConfig.from_dict(spec.config)
    if cfg_model.arch not in WIDTH_FIELD:
        raise ValueError(f"prune.method: structured pruning needs a zoo architecture {sorted(WIDTH_FIELD)}, got "
                         f"'{cfg_model.arch}'; use prune.method=unstructured for a user factory")
    if spec.factorized or any(isinstance(m, LowRank) for m in model.modules()):
        raise ValueError("prune.method: structured pruning of a factorized model is not supported; prune before factorizing")
    groups = unit_groups(model)
    widths = list(getattr(cfg_model, WIDTH_FIELD[cfg_model.arch]))
    if len(groups) != len(widths):
        raise AssertionError(f"found {len(groups)} prunable widths for {len(widths)} configured ones")
    p = 1 if cfg.importance == "l1" else 2
    state = {k: v.clone() for k, v in model.state_dict().items()}
    new_widths = []
    for group, width in zip(groups, widths):
        scores = importance(model, group, p)
        target = max(min(cfg.min_units, len(scores)), round(width * keep_fraction))
        keep = torch.sort(torch.topk(scores, min(target, len(scores))).indices).values  # keep the original order
        _slice_state(state, model, group, keep)
        new_widths.append(len(keep))
    new_cfg = cfg_model.model_copy(update={WIDTH_FIELD[cfg_model.arch]: tuple(new_widths)})
    new_spec = replace(spec, config=new_cfg.to_dict())
    pruned = build_model(new_spec)
    pruned.load_state_dict(state)  # strict: any mismatch between the slicing and the new widths fails here
    return pruned.eval(), new_spec


def _weights(model: nn.Module) -> list[tuple[nn.Module, str]]:
    return [(m, "weight") for m in model.modules() if isinstance(m, WEIGHTED)]


def prune_unstructured(model: nn.Module, amount: float) -> nn.Module:
    """Global L1 magnitude pruning of ``amount`` of the *remaining* weights; masks stay attached for fine-tuning.

    torch's pruning containers compose: a second call prunes ``amount`` of what the first left,
    which is how the iterative schedule reaches its target. ``make_permanent`` removes the masks.
    """
    torch_prune.global_unstructured(_weights(model), pruning_method=torch_prune.L1Unstructured, amount=amount)
    return model


def make_permanent(model: nn.Module) -> nn.Module:
    """Fold pruning masks into the weights (zeros stay zeros) so the state_dict is a plain one again."""
    for module, name in _weights(model):
        if torch_prune.is_pruned(module) and hasattr(module, f"{name}_mask"):
            torch_prune.remove(module, name)
    return model


def prune(model: nn.Module, spec: ModelSpec, cfg: PruneConfig,
          finetune: Callable[[nn.Module, int], dict] | None = None) -> tuple[nn.Module, ModelSpec]:
    """Prune ``model`` to ``cfg.sparsity`` over ``cfg.rounds`` rounds, calling ``finetune(model, round)`` after each.

    Each round removes the same share of what is left (geometric schedule), so the network adapts
    gradually instead of losing half its units in one step. Returns the pruned model and its spec.
    """
    keep_per_round = (1.0 - cfg.sparsity) ** (1 / cfg.rounds)
    for r in range(1, cfg.rounds + 1):
        if cfg.method == "structured":
            model, spec = prune_structured(model, spec, keep_per_round, cfg)
        else:
            prune_unstructured(model, 1.0 - keep_per_round)
        if finetune is not None:
            finetune(model, r)
    if cfg.method == "unstructured":
        make_permanent(model)
    return model.eval(), spec
