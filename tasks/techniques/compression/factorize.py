"""SVD low-rank factorization of Linear layers (and 1x1 convolutions).

A weight W (m outputs x n inputs) with singular values s_1 >= s_2 >= ... is replaced by its best
rank-r approximation (Eckart-Young) split into two layers: n -> r (no bias) and r -> m (the original
bias), each factor taking sqrt(s) so both have the same scale. That costs r * (m + n) multiply-adds
instead of m * n, so it pays only while r < m * n / (m + n); layers where the chosen rank would not
be cheaper are left alone. The rank comes from a retained-energy threshold (the smallest r whose
sum of s_i^2 reaches that share of the total) or from a fixed share of min(m, n).

Weights of a briefly trained network are close to their random initialisation and have a flat
spectrum, so an energy threshold of 0.9 often keeps nearly full rank; fine-tuning after a lower
threshold recovers the accuracy (see the README's compression section for measured numbers).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from optforge.tasks.techniques.config import TechniqueConfig
from optforge.tasks.techniques.models.models import LowRank, ModelSpec
from optforge.tasks.techniques.training.finetune import FinetuneConfig


class FactorizeConfig(TechniqueConfig):
    """How ranks are chosen and which layers are factorized."""

    mode: Literal["energy", "ratio"] = Field("energy", description="rank by retained spectral energy or by a fixed ratio")
    energy: float = Field(0.6, gt=0, le=1, description="mode=energy: share of sum(s_i^2) the kept rank retains, in (0, 1]")
    rank_ratio: float = Field(0.25, gt=0, le=1, description="mode=ratio: rank = ceil(rank_ratio * min(m, n)), in (0, 1]")
    conv1x1: bool = Field(True, description="also factorize 1x1 convolutions (pointwise convs of dscnn)")
    keep_last: bool = Field(True, description="leave the output layer alone: a rank below the class count bottlenecks "
                            "the logits to save a few thousand weights")
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig, description="fine-tuning after factorization")


def _matrix(layer: nn.Module) -> torch.Tensor:
    w = layer.weight.detach()
    return w.reshape(w.shape[0], w.shape[1])  # (m, n, 1, 1) convs become (m, n)


def factorizable(layer: nn.Module, conv1x1: bool) -> bool:
    """Linear layers, and plain 1x1 convolutions when ``conv1x1`` (depthwise and k x k convs are left alone)."""
    if isinstance(layer, nn.Linear):
        return True
    return conv1x1 and isinstance(layer, nn.Conv2d) and layer.kernel_size == (1, 1) and layer.groups == 1


def choose_rank(singular_values: torch.Tensor, cfg: FactorizeConfig) -> int:
    """Rank for one layer by ``cfg.mode`` (at least 1, at most the number of singular values)."""
    k = len(singular_values)
    if cfg.mode == "ratio":
        return min(k, max(1, math.ceil(cfg.rank_ratio * k)))
    energy = singular_values.double().pow(2).cumsum(0)
    energy = energy / energy[-1]
    # Smallest r with energy[r-1] >= threshold; the tolerance absorbs round-off at energy=1.0.
    return min(k, int((energy < cfg.energy - 1e-12).sum()) + 1)


def breaks_even(m: int, n: int, rank: int) -> bool:
    """True when rank ``rank`` would not make an m x n layer cheaper: r * (m + n) >= m * n."""
    return rank * (m + n) >= m * n


def factorize_layer(layer: nn.Module, rank: int, svd: tuple[torch.Tensor, ...] | None = None) -> LowRank:
    """The rank-``rank`` SVD approximation of ``layer`` as a ``LowRank`` pair; exact at full rank.

    ``svd`` is ``torch.linalg.svd(W, full_matrices=False)`` when the caller has it already (a
    2048 x 2048 SVD takes seconds on a CPU core, so it is computed once per layer).
    """
    pair = LowRank.like(layer, rank)  # refuses layers other than Linear and 1x1 Conv2d
    w = _matrix(layer)
    if not 1 <= rank <= min(w.shape):
        raise ValueError(f"rank: {rank} is outside [1, {min(w.shape)}] for a {tuple(w.shape)} layer")
    u, s, vh = svd if svd is not None else torch.linalg.svd(w, full_matrices=False)
    root = s[:rank].sqrt()
    first, second = vh[:rank] * root[:, None], u[:, :rank] * root[None, :]
    with torch.no_grad():
        pair[0].weight.copy_(first.reshape(pair[0].weight.shape))
        pair[1].weight.copy_(second.reshape(pair[1].weight.shape))
        if layer.bias is not None:
            pair[1].bias.copy_(layer.bias.detach())
    return pair


def factorize(model: nn.Module, spec: ModelSpec, cfg: FactorizeConfig) -> tuple[nn.Module, ModelSpec, dict]:
    """Factorize every eligible layer of ``model`` in place where it lowers the cost.

    Returns the model, its spec (a ``factorize`` transform lists the new low-rank layers so ``load_model``
    rebuilds them) and a per-layer report: shape, chosen rank, break-even rank, and whether it was
    factorized.
    """
    inside_lowrank = {f"{n}.{c}" for n, m in model.named_modules() if isinstance(m, LowRank) for c, _ in m.named_children()}
    targets = [(n, m) for n, m in model.named_modules()
               if n and n not in inside_lowrank and factorizable(m, cfg.conv1x1)]
    if cfg.keep_last:  # zoo modules are registered in forward order: the last weighted layer is the head
        head = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))][-1:]
        targets = [(n, m) for n, m in targets if n not in head]
    ranks, report = {}, {}
    for name, layer in targets:
        w = _matrix(layer)
        m, n = w.shape
        svd = torch.linalg.svd(w, full_matrices=False)
        rank = choose_rank(svd[1], cfg)
        apply = not breaks_even(m, n, rank)
        report[name] = {"shape": [m, n], "rank": rank, "break_even": round(m * n / (m + n), 2), "factorized": apply}
        if apply:
            parent_path, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent_path), leaf, factorize_layer(layer, rank, svd))
            ranks[name] = rank
    return model.eval(), (spec.then("factorize", {"ranks": ranks}) if ranks else spec), report
