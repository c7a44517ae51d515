"""Binary weights (XNOR-Net / BinaryConnect style): each weight becomes ``sign(w) * scale[channel]``.

The scale of an output channel is the mean absolute value of its latent float weights, the least-squares
best one for fixed signs. Fine-tuning keeps the latent float weights and trains them through the sign
with a straight-through estimator (the sign's gradient taken as 1 where ``|w| <= 1``, 0 beyond, so
saturated weights stop drifting). The first and last weighted layers keep full precision by default:
they see the raw input and produce the logits, and binarizing them costs the most accuracy for the
fewest weights. ``bake`` leaves plain ``+-scale`` weights for export; ``pack`` stores one bit per weight.

This buys size, not speed: no kernel here multiplies by signs (ONNX Runtime and PyTorch run the baked
weights as float), so latency is the FP32 model's.
"""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import Field
from torch import nn
from torch.nn.utils import parametrize

from optforge.tasks.techniques.compression.packing import bake_weights, save_packed, signs_entry
from optforge.tasks.techniques.config import TechniqueConfig
from optforge.tasks.techniques.training.finetune import FinetuneConfig

WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d)


class BinarizeConfig(TechniqueConfig):
    """Binary weights with a per-channel scale, fine-tuned with a straight-through estimator."""

    keep_first_last: bool = Field(True, description="keep the first and last weighted layers in full precision")
    min_weights: int = Field(1024, ge=1, description="layers with fewer weights stay in full precision")
    finetune: FinetuneConfig = Field(default_factory=lambda: FinetuneConfig(epochs=8),
                                     description="fine-tuning through the signs (straight-through)")


class _SignSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w):
        ctx.save_for_backward(w)
        return torch.where(w >= 0, 1.0, -1.0).to(w.dtype)

    @staticmethod
    def backward(ctx, grad):
        (w,) = ctx.saved_tensors
        return grad * (w.abs() <= 1).to(grad.dtype)


class SignScale(nn.Module):
    """``weight = sign(latent) * mean(|latent|)`` per output channel: the parametrization of a binary layer."""

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        scale = latent.abs().flatten(1).mean(1).view(-1, *([1] * (latent.dim() - 1)))
        return _SignSTE.apply(latent) * scale


def binary_layers(model: nn.Module, cfg: BinarizeConfig) -> list[str]:
    """The layers ``binarize`` turns binary: weighted layers of at least ``min_weights``, less the first and last."""
    weighted = [name for name, m in model.named_modules() if isinstance(m, WEIGHTED)]
    kept = set(weighted[:1] + weighted[-1:]) if cfg.keep_first_last else set()
    return [name for name in weighted if name not in kept and model.get_submodule(name).weight.numel() >= cfg.min_weights]


def binarize(model: nn.Module, cfg: BinarizeConfig) -> list[str]:
    """Parametrize the chosen layers' weights as ``SignScale`` (in place); returns their names."""
    names = binary_layers(model, cfg)
    for name in names:
        parametrize.register_parametrization(model.get_submodule(name), "weight", SignScale())
    return names


def bake(model: nn.Module) -> list[str]:
    """Replace each ``SignScale`` parametrization by its ``+-scale`` weight; returns the layers baked."""
    return list(bake_weights(model, SignScale))


def pack(model: nn.Module, names: list[str], path: str | Path) -> int:
    """Write the stored form (``packing``): one bit per binary weight and a scale per channel; returns the bytes."""
    entries = {}
    for name in names:
        w = model.get_submodule(name).weight.detach().cpu()
        entries[f"{name}.weight"] = signs_entry(w.numpy(), w.abs().flatten(1).amax(1).numpy())
    return save_packed(model.state_dict(), entries, path)
