"""The input contract: what a model takes, described once and read by every stage.

A contract names each input tensor, its dtype and its shape, with symbolic names for the dimensions
that vary (``batch`` always, ``sequence`` for text). It travels with the data reference, so export
(input names, dynamic axes), calibration and timing (example batches), FLOPs, serving (the pyfunc's
pre-processing) and the training loop (batches as ``{name: tensor}`` mappings plus labels) all build
their inputs from it and never from a feature count. The models are Olive's ``IoConfig`` and
Optimum's ``OnnxConfig.inputs`` (name -> dynamic axes).

Kinds:
- ``table``: one float32 input ``input`` of shape (batch, F), today's numeric data; ``image_shape``
  (C, H, W) lets the zoo CNNs reshape flat rows (digits);
- ``image``: one float32 input ``pixel_values`` of shape (batch, C, H, W), normalised;
- ``text``: int64 ``input_ids`` and ``attention_mask`` of shape (batch, sequence).

Calling a model with a batch goes through ``forward_logits``: a model whose ``forward`` names the
inputs gets them by keyword (Hugging Face models, user factories taking ``pixel_values``), a
single-input model that names its argument otherwise (the zoo's ``forward(x)``) gets it by
position, and Hugging Face outputs are reduced to their ``logits``.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

Kind = Literal["table", "image", "text"]
DTYPES = {"float32": (np.float32, torch.float32), "int64": (np.int64, torch.int64)}
BATCH, SEQUENCE = "batch", "sequence"


@dataclass(frozen=True)
class TensorSpec:
    """One input: name, dtype ("float32" | "int64") and shape, ``str`` entries being dynamic dimensions."""

    name: str
    dtype: Literal["float32", "int64"]
    shape: tuple[int | str, ...]

    def sample_shape(self) -> tuple[int | str, ...]:
        """The shape of one sample (without the batch dimension)."""
        return tuple(self.shape[1:])

    def concrete(self, batch: int, sequence: int | None = None) -> tuple[int, ...]:
        """The shape at ``batch`` rows; a ``sequence`` dimension takes ``sequence`` (required for text)."""
        out = []
        for d in self.shape:
            if d == BATCH:
                out.append(batch)
            elif isinstance(d, str):
                if sequence is None:
                    raise ValueError(f"input {self.name}: dimension '{d}' needs a length")
                out.append(sequence)
            else:
                out.append(int(d))
        return tuple(out)


@dataclass(frozen=True)
class InputContract:
    """A model's inputs and what produced them (see the module docstring)."""

    kind: Kind
    inputs: tuple[TensorSpec, ...]
    num_classes: int
    # (C, H, W) of flat table rows that are images (digits); the zoo CNNs reshape with it.
    image_shape: tuple[int, int, int] | None = None
    # How raw data becomes these tensors, for serving: image resize/crop/mean/std, text max_length.
    preprocessing: dict[str, Any] = field(default_factory=dict)
    # The sequence length the data was tokenized to (text): the "opt" shape of timing and engines.
    sequence_length: int | None = None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs)

    @property
    def num_features(self) -> int:
        """Values per sample of a one-input float contract (the MLP's input width)."""
        if len(self.inputs) != 1 or self.inputs[0].dtype != "float32":
            raise ValueError(f"a {self.kind} contract with inputs {list(self.names)} has no flat feature width")
        return int(np.prod([int(d) for d in self.inputs[0].sample_shape()]))

    def spec(self, name: str) -> TensorSpec:
        return next(t for t in self.inputs if t.name == name)

    def example(self, batch: int = 2, sequence: int | None = None) -> dict[str, torch.Tensor]:
        """Zero-ish example tensors at ``batch`` rows (text: all-ones attention mask, token id 1)."""
        sequence = sequence or self.sequence_length
        out = {}
        for t in self.inputs:
            shape = t.concrete(batch, sequence)
            out[t.name] = torch.ones(shape, dtype=torch.int64) if t.dtype == "int64" else torch.randn(shape)
        return out

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """``{input: {axis: name}}`` of every symbolic dimension (Optimum's ``OnnxConfig.inputs`` form)."""
        return {t.name: {i: d for i, d in enumerate(t.shape) if isinstance(d, str)} for t in self.inputs}

    def key(self) -> str:
        """What must match for two models to be compared on the same data: kind, names, dtypes, sample
        shapes (a registered champion with another key takes other inputs)."""
        return json.dumps([self.kind, [[t.name, t.dtype, list(t.sample_shape())] for t in self.inputs],
                           self.num_classes], separators=(",", ":"))

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> InputContract:
        inputs = tuple(TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in raw["inputs"])
        shape = tuple(raw["image_shape"]) if raw.get("image_shape") else None
        return cls(raw["kind"], inputs, int(raw["num_classes"]), shape, dict(raw.get("preprocessing") or {}),
                   raw.get("sequence_length"))


def table_contract(num_features: int, num_classes: int, image_shape=None) -> InputContract:
    """Today's numeric data: one float input ``input`` of shape (batch, F)."""
    return InputContract("table", (TensorSpec("input", "float32", (BATCH, int(num_features))),), int(num_classes),
                         tuple(image_shape) if image_shape else None)


def image_contract(channels: int, size: int, num_classes: int, preprocessing: dict) -> InputContract:
    return InputContract("image", (TensorSpec("pixel_values", "float32", (BATCH, channels, size, size)),),
                         int(num_classes), (channels, size, size), preprocessing)


def text_contract(max_length: int, num_classes: int, preprocessing: dict) -> InputContract:
    specs = tuple(TensorSpec(n, "int64", (BATCH, SEQUENCE)) for n in ("input_ids", "attention_mask"))
    return InputContract("text", specs, int(num_classes), None, preprocessing, int(max_length))


# --- calling a model with named inputs -------------------------------------------------------------

def _forward_params(model: nn.Module) -> tuple[list[str], bool]:
    """(named parameters of ``model.forward``, whether it takes ``**kwargs``)."""
    params = inspect.signature(model.forward).parameters.values()
    names = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY, p.POSITIONAL_ONLY)]
    return names, any(p.kind == p.VAR_KEYWORD for p in params)


def call_style(model: nn.Module, names: tuple[str, ...]) -> Literal["keyword", "positional"]:
    """How ``model`` takes inputs ``names``: by keyword when ``forward`` names them all, by position when
    it takes one input under another name (``forward(x)``).

    Raises:
        ValueError: the forward's arguments do not match the data's inputs; lists both.
    """
    target = _unwrapped(model)
    params, var_kw = _forward_params(target)
    if var_kw or all(n in params for n in names):
        return "keyword"
    positional = [p for p in inspect.signature(target.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)]
    required = [p for p in positional if p.default is p.empty and p.kind != p.VAR_POSITIONAL]
    # One input by position only into a forward that has exactly one place for it: forward(x), forward(x, /),
    # forward(*xs). An HF-style forward(input_ids=None, ...) must not swallow a table's "input" silently.
    if len(names) == 1 and (len(required) == 1 or (len(positional) == 1 and not required)):
        return "positional"
    raise ValueError(f"model.arch: {type(target).__name__}.forward takes {params} but the data's inputs are "
                     f"{list(names)}; name the forward's arguments after the inputs")


def _unwrapped(model: nn.Module) -> nn.Module:
    """The user's module inside DDP (``.module``) or ``torch.compile`` (``._orig_mod``) wrappers."""
    for attr in ("module", "_orig_mod"):
        if isinstance(getattr(model, attr, None), nn.Module):
            return _unwrapped(getattr(model, attr))
    return model


_STYLE_CACHE: dict[tuple[type, tuple[str, ...]], str] = {}


def logits_of(out: Any) -> torch.Tensor:
    """The logits of a model's output: a tensor, a Hugging Face ``ModelOutput`` or a tuple whose first item they are."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"model output {type(out).__name__} holds no logits tensor")


def forward_logits(model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``model``'s logits for a batch given as ``{input name: tensor}`` (see ``call_style``)."""
    names = tuple(inputs)
    key = (type(_unwrapped(model)), names)
    style = _STYLE_CACHE.get(key) or _STYLE_CACHE.setdefault(key, call_style(model, names))
    out = model(**inputs) if style == "keyword" else model(*inputs.values())
    return logits_of(out)


class LogitsModule(nn.Module):
    """``model`` with positional inputs in contract order and a plain logits tensor out: what ONNX export
    and ``torch.export`` trace. It holds ``model`` as a child, so it shares its weights."""

    def __init__(self, model: nn.Module, names: tuple[str, ...]):
        super().__init__()
        self.model, self.names = model, tuple(names)

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return forward_logits(self.model, dict(zip(self.names, tensors)))


def to_device(batch: Mapping[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def as_tensors(batch: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """numpy batch -> torch tensors (copies: memory-mapped arrays are read-only)."""
    return {k: torch.from_numpy(np.array(v)) for k, v in batch.items()}
