"""Counting what a model costs: forward FLOPs, parameters, zero weights.

FLOPs come from PyTorch's own ``torch.utils.flop_counter.FlopCounterMode``, which counts matrix
multiplies and convolutions (2 FLOPs per multiply-add) at the operator level, so a factorized layer
or a pruned width is counted from what actually runs, not from a formula kept beside the model.
Element-wise work (ReLU, BatchNorm, bias adds) is not counted; it is a rounding error next to the
matrix work of every model here.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from optforge.tasks.techniques.contract import InputContract, forward_logits
from optforge.tasks.techniques.models.models import count_params

# Layers whose weights pruning and sparsity talk about; biases and norms are a few hundred values.
WEIGHTED = (nn.Linear, nn.Conv2d)


def count_flops(model: nn.Module, contract: InputContract, batch_size: int = 1) -> int:
    """Forward FLOPs for one batch of ``batch_size`` samples at the contract's shapes (default: per sample;
    text at the data's sequence length).

    Dense kernels do the same work whatever the values, so a model with zeroed (unstructurally
    pruned) weights counts the same FLOPs as before pruning: this is what it costs, not what it could.
    """
    was_training = model.training
    params = list(model.parameters())
    needs_grad = [p.requires_grad for p in params]
    model.eval()
    # FlopCounterMode's module tracker hooks the gradient of every tensor that requires one; a model that passes
    # a parameter itself into a submodule (DeBERTa's relative embeddings) trips it under no_grad, so no
    # parameter requires a gradient while counting.
    for p in params:
        p.requires_grad_(False)
    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            forward_logits(model, contract.example(batch=batch_size))
    finally:
        for p, flag in zip(params, needs_grad):
            p.requires_grad_(flag)
        model.train(was_training)
    return int(counter.get_total_flops())


def weight_sparsity(model: nn.Module) -> float:
    """Fraction of exact zeros among the weights of Linear and Conv2d layers (biases excluded)."""
    total = zeros = 0
    for module in model.modules():
        if isinstance(module, WEIGHTED):
            total += module.weight.numel()
            zeros += int((module.weight == 0).sum())
    return zeros / total if total else 0.0


def model_stats(model: nn.Module, contract: InputContract) -> dict[str, float]:
    """``params``, ``flops`` (per sample) and ``sparsity`` of a model: what every variant's info carries."""
    return {"params": count_params(model), "flops": count_flops(model, contract),
            "sparsity": round(weight_sparsity(model), 6)}
