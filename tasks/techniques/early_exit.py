"""Early-exit inference (BranchyNet, Teerapittayanon et al. 2016): exit heads after intermediate blocks.

A model is cut into blocks (an MLP's hidden layers, a CNN's conv blocks); after each chosen block a small
head (a Linear, after global pooling for feature maps) predicts the classes. At inference each sample
leaves at the first head whose softmax confidence reaches ``threshold``; the blocks after it run only
while some sample of the batch is still unsure. So a batch of one runs as few blocks as its sample needs,
and a sample's answer never depends on what else is in its batch: accuracy measured at any batch size is
the accuracy of batch-1 serving.

The routing exports as ONNX control flow: the dynamo exporter turns ``torch.cond`` into nested ``If``
nodes, so the exported file is one ordinary ONNX model that ONNX Runtime, the benchmark and the registered
pyfunc run unchanged, and the benchmark's batch-1 timing over test rows times the real mix of exits. In
eager PyTorch the same routing is a Python ``if``.

Hugging Face and factory models have no block structure this module can see (a transformer's layers need
its attention mask threaded between segments); the plan skips the step for them, saying so.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from pydantic import Field, field_validator
from torch import nn

from optforge.tasks.techniques.config import TechniqueConfig
from optforge.tasks.techniques.distill import FinetuneConfig
from optforge.tasks.techniques.models import DSCNN, MLP, SmallCNN

NEVER = 1.01  # a threshold no softmax reaches: the model always runs to its own head

THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999)


class EarlyExitConfig(TechniqueConfig):
    """Where the exit heads go, how they train, and how the confidence threshold is chosen."""

    exits: list[int] | None = Field(None, description="blocks (0-based) followed by an exit head; None: every block "
                                    "but the last (whose head is the model's own)")
    threshold: float | None = Field(None, gt=0, le=1, description="softmax confidence at which a sample leaves; "
                                    "None: the lowest of `thresholds` whose validation accuracy stays within "
                                    "max_accuracy_drop of the full model's")
    thresholds: list[float] = Field(list(THRESHOLDS), description="candidate thresholds in (0, 1]: the search "
                                    "grid and the points of the accuracy-latency curve")
    max_accuracy_drop: float = Field(1.0, ge=0, description="validation accuracy points the exits may cost against "
                                     "the full model when the threshold is chosen")
    joint: bool = Field(False, description="False: the backbone is frozen and only the heads train (the full "
                        "model's answers stay as they were); True: backbone and heads train together")
    finetune: FinetuneConfig = Field(default_factory=lambda: FinetuneConfig(epochs=4, lr=3e-3, kd_alpha=0.5),
                                     description="training of the heads; kd_alpha weighs the final head's soft "
                                     "targets (self-distillation) against the labels")

    @field_validator("thresholds")
    @classmethod
    def _in_unit_interval(cls, v: list[float]) -> list[float]:
        if not v or any(not 0 < t <= 1 for t in v):
            raise ValueError(f"expected a non-empty list of thresholds in (0, 1], got {v}")
        return sorted(set(v))


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1)


def _images(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    return x.reshape(-1, *shape)


@dataclass
class Blocks:
    """A model seen as ``final(block_n(... block_0(prepare(x))))``; the modules are the model's own."""

    prepare: object  # x -> the first block's input (flattened rows, or images)
    blocks: list[nn.Module]
    final: nn.Module  # the model's own head
    pooled: bool  # feature maps: an exit head pools them first


def blocks_of(model: nn.Module) -> Blocks:
    """The block structure of a zoo model (explicit dispatch on its class).

    Raises:
        ValueError: ``model`` is not a zoo MLP or CNN.
    """
    if isinstance(model, MLP):  # net = [Linear, ReLU, Dropout] per hidden layer, then the head Linear
        net = model.net
        return Blocks(_rows, [net[i:i + 3] for i in range(0, len(net) - 1, 3)], net[-1], False)
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
        starts = [0, *cuts[:-1]]
        return Blocks(partial(_images, shape=tuple(model.image_shape)), [nn.Sequential(*layers[a:b]) for a, b in zip(starts, cuts)],
                      model.head, True)
    raise ValueError(f"early_exit: cannot see blocks in a {type(model).__name__}; exit heads are supported for the "
                     "zoo MLP, CNN and DSCNN (Hugging Face and factory models: not yet)")


def check_exits(exits: list[int] | None, count: int) -> list[int]:
    """The exit blocks, checked against a model of ``count`` blocks (the last has the model's own head)."""
    chosen = list(range(count - 1)) if exits is None else sorted(set(exits))
    bad = [i for i in chosen if not 0 <= i < count - 1]
    if bad or not chosen:
        raise ValueError(f"compress.early_exit.exits: {exits} must name blocks 0..{count - 2} of this model's {count} "
                         "blocks (the last block already has the model's head)" if count > 1 else
                         "compress.early_exit: this model has one block, so there is nowhere to exit early")
    return chosen


class EarlyExitModel(nn.Module):
    """``base`` with exit heads; ``forward`` returns each sample's logits from its first confident exit."""

    def __init__(self, base: nn.Module, exits: list[int], num_classes: int, example: torch.Tensor,
                 threshold: float = NEVER):
        super().__init__()
        self.base = base
        # A plain list, not a ModuleList: the blocks are base's own modules and must not be saved twice.
        self._split = blocks_of(base)
        self.exits = check_exits(exits, len(self._split.blocks))
        widths = self._widths(example)
        self.heads = nn.ModuleDict({str(i): self._head(widths[i], num_classes) for i in self.exits})
        self.register_buffer("threshold", torch.tensor(float(threshold)))

    def _head(self, width: int, num_classes: int) -> nn.Module:
        if self._split.pooled:
            return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))
        return nn.Linear(width, num_classes)

    @torch.no_grad()
    def _widths(self, example: torch.Tensor) -> list[int]:
        """Each block's output features (channels), from one example: right for pruned or factorized models too."""
        was = self.base.training
        self.base.eval()
        h, out = self._split.prepare(example[:1]), []
        for block in self._split.blocks:
            h = block(h)
            out.append(int(h.shape[1]))
        self.base.train(was)
        return out

    def exit_logits(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Logits of every exit head, then of the model's own head: the training and calibration view."""
        h, out = self._split.prepare(x), []
        for i, block in enumerate(self._split.blocks):
            h = block(h)
            if str(i) in self.heads:
                out.append(self.heads[str(i)](h))
        return [*out, self._split.final(h)]

    def through(self, x: torch.Tensor, position: int) -> torch.Tensor:
        """Logits of exit ``position`` (an index into ``exits``, or ``len(exits)`` for the model's own head),
        running only the blocks before it: what a sample leaving there costs."""
        last = self.exits[position] if position < len(self.exits) else len(self._split.blocks) - 1
        h = self._split.prepare(x)
        for block in self._split.blocks[:last + 1]:
            h = block(h)
        return self.heads[str(last)](h) if position < len(self.exits) else self._split.final(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._from(0, self._split.prepare(x), None, None)

    def _from(self, i: int, h: torch.Tensor, out: torch.Tensor | None, done: torch.Tensor | None) -> torch.Tensor:
        """Run block ``i`` onwards; ``out`` holds each sample's answer so far, ``done`` which samples have left."""
        blocks = self._split.blocks
        h = blocks[i](h)
        if i == len(blocks) - 1:
            logits = self._split.final(h)
            return logits if done is None else torch.where(done[:, None], out, logits)
        if str(i) not in self.heads:
            return self._from(i + 1, h, out, done)
        logits = self.heads[str(i)](h)
        confident = logits.softmax(-1).amax(-1) >= self.threshold
        out = logits if done is None else torch.where(done[:, None], out, logits)
        done = confident if done is None else done | confident
        if torch.compiler.is_compiling():  # exporting: ONNX If nodes
            return torch.cond(done.all(), lambda h, out, done: out.clone(),
                              lambda h, out, done: self._from(i + 1, h, out, done), (h, out, done))
        return out if bool(done.all()) else self._from(i + 1, h, out, done)


def first_confident(probs: list[torch.Tensor], threshold: float) -> torch.Tensor:
    """Per sample, the index of the first exit whose top probability reaches ``threshold`` (the last exit,
    the model's own head, otherwise): the routing of ``EarlyExitModel.forward``, from precomputed outputs."""
    confident = torch.stack([p.amax(-1) >= threshold for p in probs[:-1]] + [torch.ones_like(probs[-1][:, 0],
                                                                                             dtype=torch.bool)], 1)
    return confident.int().argmax(1)
