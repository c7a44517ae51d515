"""Quantization-aware fine-tuning (QAT), exported as a QDQ ONNX model that ONNX Runtime runs in INT8.

Post-training INT8 rounds weights and activations that were trained in float; a small model has little
slack and loses accuracy (the default run's distilled student: 1.1 points). QAT fine-tunes with the
rounding in the forward pass, so the weights settle where rounding costs little:

- every Linear and Conv2d gets its weight fake-quantized to INT8, symmetric, one scale per output
  channel (max |w| / 127, or / 63 where the CPU's integer kernels saturate, recomputed each step), and its input and output
  fake-quantized to UINT8, one scale per tensor, from an exponential moving average of the observed
  range (frozen in eval mode). Gradients pass the rounding straight through (STE) inside the range;
- BatchNorm is folded into the convolution before, so the INT8 convolution is the one that runs;
- the export keeps the fake-quantize ops as QuantizeLinear/DequantizeLinear pairs (the TorchScript
  exporter maps them; the dynamo exporter cannot trace them with a dynamic batch in torch 2.13), and
  ONNX Runtime's basic, portable graph optimizations fold each weight's QuantizeLinear into an INT8
  initializer. ORT then fuses ``DQ -> MatMul/Gemm/Conv -> Q`` into its integer kernels (QGemm,
  QLinearMatMul, QLinearConv); TensorRT reads the same QDQ file.

Both the input and the output of a layer carry a quantizer because ORT's integer kernels need a
quantized input and a quantized output; a layer without the second one would run in float on
dequantized weights.
"""

from __future__ import annotations

import copy
import itertools
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from optforge.tasks.techniques.config import TechniqueConfig
from optforge.tasks.techniques.contract import InputContract, forward_logits
from optforge.tasks.techniques.files import atomic_write
from optforge.tasks.techniques.measurement.benchmark import int8_dot_saturates
from optforge.tasks.techniques.onnx.export import export_torchscript
from optforge.tasks.techniques.training.finetune import FinetuneConfig


def _qat_finetune_default() -> FinetuneConfig:
    # Starting from a trained model: a short, gentle schedule (a tenth of the student's training LR), distilling
    # from the teacher as prune and factorize do.
    return FinetuneConfig(epochs=4, lr=3e-4, kd_alpha=0.7)


class QatConfig(TechniqueConfig):
    """Quantization-aware fine-tuning and its QDQ export."""

    momentum: float = Field(0.9, ge=0, lt=1, description="EMA momentum of each activation's observed min/max")
    opset: int = Field(18, ge=13, le=20, description="opset of the QDQ export (per-channel QDQ needs >= 13)")
    reduce_range: bool | None = Field(
        None, description="INT8 weights in 7 bits (-63..63), as ORT's integer kernels need on x86 CPUs without "
                          "VNNI to avoid int16 saturation; unset: decided from this machine's CPU")
    finetune: FinetuneConfig = Field(default_factory=_qat_finetune_default, description="fine-tuning with fake quantization")


class ActQuant(nn.Module):
    """Per-tensor UINT8 fake quantization with an EMA-observed range that always contains 0."""

    def __init__(self, momentum: float):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("lo", torch.tensor(0.0))
        self.register_buffer("hi", torch.tensor(0.0))
        self.register_buffer("seen", torch.tensor(False))

    def qparams(self) -> tuple[float, int]:
        lo, hi = min(float(self.lo), 0.0), max(float(self.hi), 0.0)
        scale = max(hi - lo, 1e-8) / 255
        return scale, int(min(255, max(0, round(-lo / scale))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                lo, hi = x.min(), x.max()
                if not bool(self.seen):
                    self.lo.copy_(lo), self.hi.copy_(hi), self.seen.fill_(True)
                else:
                    self.lo.mul_(self.momentum).add_((1 - self.momentum) * lo)
                    self.hi.mul_(self.momentum).add_((1 - self.momentum) * hi)
        if not bool(self.seen):
            return x  # never observed (a layer no data reached): leave it float rather than guess a range
        scale, zero_point = self.qparams()
        return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, 0, 255)


class QuantLayer(nn.Module):
    """A Linear or Conv2d with fake-quantized input, weights (INT8 per output channel) and output."""

    def __init__(self, layer: nn.Linear | nn.Conv2d, momentum: float, weight_max: int = 127):
        super().__init__()
        self.layer, self.inp, self.out = layer, ActQuant(momentum), ActQuant(momentum)
        self.weight_max = weight_max

    def quantized_weight(self) -> torch.Tensor:
        w = self.layer.weight
        scale = (w.detach().abs().flatten(1).amax(1).clamp_min(1e-8) / self.weight_max).float()
        # (-128, 127) is what ONNX's QuantizeLinear allows for int8; symmetric scales never reach -128.
        return torch.fake_quantize_per_channel_affine(w, scale, torch.zeros_like(scale, dtype=torch.int32), 0, -128, 127)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, w = self.inp(x), self.quantized_weight()
        if isinstance(self.layer, nn.Linear):
            y = F.linear(x, w, self.layer.bias)
        else:
            y = self.layer._conv_forward(x, w, self.layer.bias)
        return self.out(y)


def fold_batchnorms(model: nn.Module, contract: InputContract) -> int:
    """Fold each BatchNorm2d that directly follows a Conv2d of the same parent (registration order) into it,
    in place; returns how many. The model's outputs are checked unchanged, else the folding is undone."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    original = copy.deepcopy(model)
    folded = 0
    for parent in list(model.modules()):
        children = list(parent.named_children())
        for (conv_name, conv), (bn_name, bn) in itertools.pairwise(children):
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.num_features == conv.out_channels:
                setattr(parent, conv_name, fuse_conv_bn_eval(conv.eval(), bn.eval()))
                setattr(parent, bn_name, nn.Identity())
                folded += 1
    if folded:
        x = contract.example(batch=2)
        with torch.no_grad():
            same = torch.allclose(forward_logits(original.eval(), x), forward_logits(model.eval(), x), atol=1e-4)
        if not same:  # a BatchNorm that was not applied right after its conv: put the original modules back
            for name, child in original.named_children():
                setattr(model, name, child)
            return 0
    return folded


def settled_reduce_range(reduce_range: bool | None) -> bool:
    """``compress.qat.reduce_range`` as set, or, unset, whether this CPU's integer kernels saturate 8-bit weights."""
    return int8_dot_saturates() if reduce_range is None else reduce_range


def prepare(model: nn.Module, contract: InputContract, momentum: float = 0.9, reduce_range: bool | None = None
            ) -> nn.Module:
    """A copy of ``model`` with BatchNorms folded and every Linear/Conv2d wrapped in a ``QuantLayer``.
    ``reduce_range`` (None: decided from this CPU, ``settled_reduce_range``) keeps weights within 7 bits."""
    weight_max = 63 if settled_reduce_range(reduce_range) else 127
    model = copy.deepcopy(model).eval()
    fold_batchnorms(model, contract)
    targets = [name for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    for name in targets:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, leaf, QuantLayer(getattr(parent, leaf), momentum, weight_max))
    return model


def calibrate(model: nn.Module, batches) -> None:
    """Observe activation ranges on a few batches (train mode, no weight update) before fine-tuning starts,
    so the first steps already quantize with sensible ranges."""
    was_training = model.training
    model.train()
    with torch.no_grad():
        for inputs in batches:
            forward_logits(model, inputs)
    model.train(was_training)


def export_qdq(model: nn.Module, contract: InputContract, path: str | Path, opset: int = 18) -> Path:
    """Export a prepared model as QDQ ONNX, weights folded to INT8 initializers by ORT's basic optimizations."""
    import onnxruntime as ort

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = path.with_suffix(".fakequant.onnx")
    export_torchscript(model, contract, raw, opset)

    def fold(tmp):
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC  # portable: no fused kernels
        options.optimized_model_filepath = str(tmp)
        ort.InferenceSession(str(raw), options, providers=["CPUExecutionProvider"])

    try:
        atomic_write(path, fold)
    finally:
        raw.unlink(missing_ok=True)
    return path
