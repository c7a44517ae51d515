"""Block-circulant Linear layers computed by FFT (CirCNN, Ding et al. 2017).

An ``out x in`` weight is split into ``block x block`` blocks, each a circulant matrix: defined by its
first column ``c`` (``W[r, s] = c[(r - s) mod block]``), so a layer stores ``in * out / block`` weights
instead of ``in * out``. A circulant block times a vector is a circular convolution, so the layer runs as
``irfft(sum_j rfft(c_ij) * rfft(x_j))``: ``O(block log block)`` per block instead of ``O(block^2)``. The
complex product is written in real arithmetic (two einsums per part), which the dynamo ONNX exporter
turns into ``DFT`` and ``Einsum`` nodes that ONNX Runtime runs.

A dense layer is converted by projecting each block onto the circulant matrices (the mean of each
wrapped diagonal: the least-squares nearest circulant), then fine-tuned.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from optforge.tasks.techniques.config import TechniqueConfig
from optforge.tasks.techniques.training.finetune import FinetuneConfig


class CirculantConfig(TechniqueConfig):
    """Which Linear layers become block-circulant, with which block size."""

    block: int = Field(8, ge=2, description="block size: each block x block weight block is one circulant "
                       "matrix (block times fewer weights); must divide both widths of every converted layer")
    layers: list[str] | None = Field(None, description="module paths to convert; None: every Linear layer but the "
                                     "last (the classifier) with at least min_features inputs and outputs")
    min_features: int = Field(64, ge=2, description="with layers=None, smallest width a converted layer may have")
    finetune: FinetuneConfig = Field(default_factory=lambda: FinetuneConfig(epochs=6),
                                     description="fine-tuning after the conversion")


class BlockCirculantLinear(nn.Module):
    """``y = W x + b`` with ``W`` made of circulant ``block x block`` blocks, applied by FFT."""

    def __init__(self, in_features: int, out_features: int, block: int, bias: bool = True):
        super().__init__()
        if in_features % block or out_features % block:
            raise ValueError(f"block {block} does not divide the layer's widths {out_features} x {in_features}")
        self.in_features, self.out_features, self.block = in_features, out_features, block
        # The first column of each block: (output blocks, input blocks, block).
        self.columns = nn.Parameter(torch.zeros(out_features // block, in_features // block, block))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, block: int) -> BlockCirculantLinear:
        """The nearest block-circulant layer to ``linear`` (each block's wrapped diagonals averaged)."""
        layer = cls(linear.in_features, linear.out_features, block, linear.bias is not None)
        w = linear.weight.detach().reshape(linear.out_features // block, block, linear.in_features // block, block)
        w = w.permute(0, 2, 1, 3)  # (p, q, r, s): block (p, q), row r, column s
        r = torch.arange(block)
        with torch.no_grad():
            for k in range(block):  # c[k] = mean over r of W[r, (r - k) mod block]
                layer.columns[..., k] = w[..., r, (r - k) % block].mean(-1)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias.detach())
        return layer

    def dense(self) -> torch.Tensor:
        """The ``out x in`` weight this layer applies (for tests and parity checks)."""
        b = self.block
        r, s = torch.arange(b).view(-1, 1), torch.arange(b).view(1, -1)
        blocks = self.columns[..., (r - s) % b]  # (p, q, b, b)
        return blocks.permute(0, 2, 1, 3).reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        xb = x.reshape(-1, self.in_features // self.block, self.block)
        xf, cf = torch.fft.rfft(xb, dim=-1), torch.fft.rfft(self.columns, dim=-1)
        real = torch.einsum("pqf,nqf->npf", cf.real, xf.real) - torch.einsum("pqf,nqf->npf", cf.imag, xf.imag)
        imag = torch.einsum("pqf,nqf->npf", cf.real, xf.imag) + torch.einsum("pqf,nqf->npf", cf.imag, xf.real)
        y = torch.fft.irfft(torch.complex(real, imag), n=self.block, dim=-1).reshape(*lead, self.out_features)
        return y + self.bias if self.bias is not None else y


def chosen_layers(model: nn.Module, cfg: CirculantConfig) -> list[str]:
    """The Linear layers to convert; raises ``ValueError`` naming the field when the block cannot apply."""
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    if cfg.layers is not None:
        unknown = [n for n in cfg.layers if n not in linears]
        if unknown:
            raise ValueError(f"compress.circulant.layers: {unknown} are not Linear layers of this model "
                             f"(its Linear layers: {list(linears)[:20]})")
        names = list(cfg.layers)
    else:
        names = [n for n in list(linears)[:-1]
                 if min(linears[n].in_features, linears[n].out_features) >= cfg.min_features]
    bad = {n: (linears[n].out_features, linears[n].in_features) for n in names
           if linears[n].in_features % cfg.block or linears[n].out_features % cfg.block}
    if bad:
        raise ValueError(f"compress.circulant.block: {cfg.block} does not divide the widths (out x in) of {bad}")
    if not names:
        raise ValueError(f"compress.circulant: no Linear layer but the last has both widths >= min_features "
                         f"({cfg.min_features}); lower it or name compress.circulant.layers")
    return names


def to_circulant(model: nn.Module, cfg: CirculantConfig) -> dict[str, int]:
    """Replace the chosen Linear layers by their nearest block-circulant layers (in place); path -> block."""
    blocks = {}
    for name in chosen_layers(model, cfg):
        parent, _, leaf = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, leaf, BlockCirculantLinear.from_linear(getattr(owner, leaf), cfg.block))
        blocks[name] = cfg.block
    return blocks


def apply_blocks(model: nn.Module, blocks: dict[str, int]) -> nn.Module:
    """Give a freshly built model its block-circulant layers (untrained; the weights load afterwards)."""
    for name, block in blocks.items():
        parent, _, leaf = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        old = getattr(owner, leaf)
        setattr(owner, leaf, BlockCirculantLinear(old.in_features, old.out_features, int(block), old.bias is not None))
    return model
