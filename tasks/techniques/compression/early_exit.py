"""Early-exit inference (BranchyNet, Teerapittayanon et al. 2016): exit heads after intermediate blocks.

A model is cut into blocks (an MLP's hidden layers, a CNN's conv blocks, a transformer's layers); after each
chosen block a small head (a Linear; after global pooling for feature maps; BERT's pooler and classifier
on the [CLS] state for a transformer) predicts the classes. At inference each sample
leaves at the first head whose softmax confidence reaches ``threshold``; the blocks after it run only
while some sample of the batch is still unsure. So a batch of one runs as few blocks as its sample needs,
and a sample's answer never depends on what else is in its batch: accuracy measured at any batch size is
the accuracy of batch-1 serving.

The routing exports as ONNX control flow: the dynamo exporter turns ``torch.cond`` into nested ``If``
nodes, so the exported file is one ordinary ONNX model that ONNX Runtime, the benchmark and the registered
pyfunc run unchanged, and the benchmark's batch-1 timing over test rows times the real mix of exits. In
eager PyTorch the same routing is a Python ``if``.

``exit_blocks`` says where each model family is cut. Factory models have no block structure the step can
see; the plan skips it for them, saying so.
"""

from __future__ import annotations

import torch
from pydantic import Field, field_validator
from torch import nn

from optforge.tasks.techniques.config import TechniqueConfig
from optforge.tasks.techniques.models.exit_blocks import blocks_of
from optforge.tasks.techniques.training.finetune import FinetuneConfig

NEVER = 1.01  # a threshold no softmax reaches: the model always runs to its own head

THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999)


class EarlyExitConfig(TechniqueConfig):
    """Where the exit heads go, how they train, and how the confidence threshold is chosen."""

    RENAMED = {"max_accuracy_drop": "compress.early_exit.accuracy_budget"}

    exits: list[int] | None = Field(None, description="blocks (0-based) followed by an exit head; None: every block "
                                    "but the last (whose head is the model's own)")
    threshold: float | None = Field(None, gt=0, le=1, description="softmax confidence at which a sample leaves; "
                                    "None: the lowest of `thresholds` whose validation accuracy stays within "
                                    "accuracy_budget of the full model's")
    thresholds: list[float] = Field(list(THRESHOLDS), description="candidate thresholds in (0, 1]: the search "
                                    "grid and the points of the accuracy-latency curve")
    accuracy_budget: float = Field(1.0, ge=0, description="validation accuracy points the exits may cost against "
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
    """``base`` with exit heads; ``forward`` returns each sample's logits from its first confident exit.

    Called with the contract's inputs by keyword (``model(**inputs)``), as every stage calls models, or by
    position in contract order.
    """

    def __init__(self, base: nn.Module, exits: list[int] | None, num_classes: int, example: dict[str, torch.Tensor],
                 threshold: float = NEVER):
        super().__init__()
        self.base = base
        self.names = tuple(example)  # the contract's input names, in order
        # Plain attributes, not submodules: the blocks are base's own modules and must not be saved twice.
        self._split = blocks_of(base)
        self.exits = check_exits(exits, len(self._split.blocks))
        widths = self._widths(example)
        self.heads = nn.ModuleDict({str(i): self._split.head(widths[i], num_classes) for i in self.exits})
        self.register_buffer("threshold", torch.tensor(float(threshold)))

    @torch.no_grad()
    def _widths(self, example: dict[str, torch.Tensor]) -> list[int]:
        """Each block's output features (channels), from one example: right for pruned or factorized models too."""
        was = self.base.training
        self.base.eval()
        h, *extras = self._split.prepare({k: v[:1] for k, v in example.items()})
        out = []
        for block in self._split.blocks:
            h = block(h, *extras)
            out.append(int(h.shape[-1] if h.dim() == 3 else h.shape[1]))  # (N, L, width) for a transformer
        self.base.train(was)
        return out

    def exit_logits(self, **inputs: torch.Tensor) -> list[torch.Tensor]:
        """Logits of every exit head, then of the model's own head: the training and calibration view."""
        h, *extras = self._split.prepare(inputs)
        out = []
        for i, block in enumerate(self._split.blocks):
            h = block(h, *extras)
            if str(i) in self.heads:
                out.append(self.heads[str(i)](h))
        return [*out, self._split.final(h)]

    def through(self, position: int, **inputs: torch.Tensor) -> torch.Tensor:
        """Logits of exit ``position`` (an index into ``exits``, or ``len(exits)`` for the model's own head),
        running only the blocks before it: what a sample leaving there costs."""
        last = self.exits[position] if position < len(self.exits) else len(self._split.blocks) - 1
        h, *extras = self._split.prepare(inputs)
        for block in self._split.blocks[:last + 1]:
            h = block(h, *extras)
        return self.heads[str(last)](h) if position < len(self.exits) else self._split.final(h)

    def forward(self, *args: torch.Tensor, **inputs: torch.Tensor) -> torch.Tensor:
        # Positional inputs in contract order too: MLflow's PyTorch flavor calls model(tensor).
        h, *extras = self._split.prepare({**dict(zip(self.names, args)), **inputs})
        return self._from(0, h, None, None, *extras)

    def _from(self, i: int, h: torch.Tensor, out: torch.Tensor | None, done: torch.Tensor | None,
              *extras: torch.Tensor) -> torch.Tensor:
        """Run block ``i`` onwards; ``out`` holds each sample's answer so far, ``done`` which samples have left."""
        blocks = self._split.blocks
        h = blocks[i](h, *extras)
        if i == len(blocks) - 1:
            logits = self._split.final(h)
            return logits if done is None else torch.where(done[:, None], out, logits)
        if str(i) not in self.heads:
            return self._from(i + 1, h, out, done, *extras)
        logits = self.heads[str(i)](h)
        confident = logits.softmax(-1).amax(-1) >= self.threshold
        out = logits if done is None else torch.where(done[:, None], out, logits)
        done = confident if done is None else done | confident
        if torch.compiler.is_compiling():  # exporting: ONNX If nodes
            return torch.cond(done.all(), lambda h, out, done, *extras: out.clone(),
                              lambda h, out, done, *extras: self._from(i + 1, h, out, done, *extras),
                              (h, out, done, *extras))
        return out if bool(done.all()) else self._from(i + 1, h, out, done, *extras)


def first_confident(probs: list[torch.Tensor], threshold: float) -> torch.Tensor:
    """Per sample, the index of the first exit whose top probability reaches ``threshold`` (the last exit,
    the model's own head, otherwise): the routing of ``EarlyExitModel.forward``, from precomputed outputs."""
    confident = torch.stack([p.amax(-1) >= threshold for p in probs[:-1]] + [torch.ones_like(probs[-1][:, 0],
                                                                                             dtype=torch.bool)], 1)
    return confident.int().argmax(1)
