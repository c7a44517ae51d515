"""The model zoo and user models by import path.

Every model maps float32 features (N, F) to logits (N, C). Models are rebuilt from a small JSON spec
plus a ``state_dict`` loaded with ``weights_only=True``: nothing is unpickled, so a checkpoint from
elsewhere cannot run code. A user factory is the one place user code runs, by the user's own choice
(its import path is in their config).

Compressed models stay rebuildable from their spec: a structurally pruned zoo model is the same
architecture with smaller widths in ``config``, and a factorized model lists its low-rank layers in
``ModelSpec.factorized`` (module path -> rank), which ``build_model`` re-applies before the weights load.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, field_validator
from torch import nn

from tasks.techniques.config import TechniqueConfig
from tasks.techniques.files import atomic_write

ZOO = ("mlp", "cnn", "dscnn")


class ModelConfig(TechniqueConfig):
    """Which model to build; shapes come from the data."""

    arch: str = Field(
        "mlp", description="'mlp', 'cnn' or 'dscnn' (depthwise-separable; both need image data), or a user factory "
        "'package.module:function'"
    )
    # 2048-2048-1024 (6.4 M params, 26 MB): big enough that matrix work, not Python call overhead,
    # dominates batch-1 latency, so speed-ups of smaller variants mean something.
    hidden: tuple[int, ...] = Field((2048, 2048, 1024), description="MLP hidden layer widths")
    channels: tuple[int, ...] = Field(
        (32, 64), description="CNN conv channels, one 3x3 conv block each (dscnn: stem conv, then one separable block each)"
    )
    dropout: float = Field(0.1, ge=0, lt=1, description="dropout before each hidden Linear's activation output")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="extra keyword arguments for a user factory")

    @field_validator("arch")
    @classmethod
    def _arch_known(cls, v: str) -> str:
        if v not in ZOO and ":" not in v:
            raise ValueError(f"expected one of {list(ZOO)} or an import path 'package.module:factory', got '{v}'")
        return v

    @field_validator("hidden", "channels")
    @classmethod
    def _positive(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v or any(w < 1 for w in v):
            raise ValueError(f"expected a non-empty list of positive widths, got {list(v)}")
        return v


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a model's architecture (saved next to its weights)."""

    config: dict[str, Any]
    num_features: int
    num_classes: int
    image_shape: tuple[int, int, int] | None = None
    # Low-rank layers of a factorized model: module path -> rank. None for every other model, so
    # model.json files written before factorization existed still load.
    factorized: dict[str, int] | None = None


class MLP(nn.Module):
    """Plain MLP: Linear -> ReLU -> Dropout per hidden layer, then a Linear head."""

    def __init__(self, num_features: int, num_classes: int, hidden=(512, 512), dropout: float = 0.1):
        super().__init__()
        layers: list[nn.Module] = []
        width = num_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(dropout)]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SmallCNN(nn.Module):
    """Conv(3x3) -> BN -> ReLU blocks, max-pool after each while the map is >= 4 px, global pool, head.

    Takes flat input and reshapes to ``image_shape`` so that data, export and benchmark code treat
    every model alike.
    """

    def __init__(self, image_shape, num_classes: int, channels=(32, 64), dropout: float = 0.1):
        super().__init__()
        self.image_shape = tuple(image_shape)
        c, h, _ = self.image_shape
        blocks: list[nn.Module] = []
        for out in channels:
            blocks += [nn.Conv2d(c, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU()]
            if h >= 4:
                blocks.append(nn.MaxPool2d(2))
                h //= 2
            c = out
        self.features = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(c, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.reshape(-1, *self.image_shape)))


class DSCNN(nn.Module):
    """MobileNet-style CNN: a 3x3 stem conv, then depthwise-separable blocks, global pool, head.

    Each block is a 3x3 depthwise conv (one filter per channel, stride 2 while the map is >= 4 px)
    followed by a 1x1 pointwise conv, each Conv -> BN -> ReLU: about 8-9x fewer multiply-adds than a
    full 3x3 conv of the same widths, which is what makes it a student architecture for image data.
    """

    def __init__(self, image_shape, num_classes: int, channels=(16, 32, 64), dropout: float = 0.1):
        super().__init__()
        self.image_shape = tuple(image_shape)
        c, h, _ = self.image_shape
        layers: list[nn.Module] = [nn.Conv2d(c, channels[0], 3, padding=1, bias=False), nn.BatchNorm2d(channels[0]),
                                   nn.ReLU()]
        c = channels[0]
        for out in channels[1:]:
            stride = 2 if h >= 4 else 1
            h = -(-h // stride)
            layers += [nn.Conv2d(c, c, 3, stride=stride, padding=1, groups=c, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                       nn.Conv2d(c, out, 1, bias=False), nn.BatchNorm2d(out), nn.ReLU()]
            c = out
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(c, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.reshape(-1, *self.image_shape)))


class LowRank(nn.Sequential):
    """A Linear (or 1x1 Conv2d) of shape m x n replaced by n -> r -> m: ``r * (m + n)`` weights instead of ``m * n``.

    The first factor has no bias; the second keeps the original bias. Its own class so that
    factorization and pruning recognise layers that were already factorized.
    """

    @classmethod
    def like(cls, layer: nn.Module, rank: int) -> LowRank:
        if isinstance(layer, nn.Linear):
            return cls(nn.Linear(layer.in_features, rank, bias=False),
                       nn.Linear(rank, layer.out_features, bias=layer.bias is not None))
        if isinstance(layer, nn.Conv2d) and layer.kernel_size == (1, 1) and layer.groups == 1:
            return cls(nn.Conv2d(layer.in_channels, rank, 1, stride=layer.stride, bias=False),
                       nn.Conv2d(rank, layer.out_channels, 1, bias=layer.bias is not None))
        raise ValueError(f"factorize: cannot factorize {type(layer).__name__} {layer}; expected Linear or 1x1 Conv2d")


def apply_ranks(model: nn.Module, ranks: dict[str, int]) -> nn.Module:
    """Replace each named layer by a ``LowRank`` pair of that rank (untrained; weights load afterwards)."""
    for path, rank in ranks.items():
        parent_path, _, leaf = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        setattr(parent, leaf, LowRank.like(getattr(parent, leaf), int(rank)))
    return model


def build_model(spec: ModelSpec) -> nn.Module:
    """Build the (untrained) model a spec describes. Explicit dispatch: zoo names, else import path."""
    cfg = ModelConfig.from_dict(spec.config)
    if cfg.arch == "mlp":
        model = MLP(spec.num_features, spec.num_classes, cfg.hidden, cfg.dropout)
    elif cfg.arch in ("cnn", "dscnn"):
        if spec.image_shape is None:
            raise ValueError(f"model.arch: '{cfg.arch}' needs image data; set data.image_shape (C, H, W) for this dataset")
        cls = SmallCNN if cfg.arch == "cnn" else DSCNN
        model = cls(spec.image_shape, spec.num_classes, cfg.channels, cfg.dropout)
    else:
        model = _from_factory(cfg.arch, spec, cfg.kwargs)
    return apply_ranks(model, spec.factorized) if spec.factorized else model


def _from_factory(path: str, spec: ModelSpec, kwargs: dict[str, Any]) -> nn.Module:
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"model.arch: cannot import module '{module_name}' of '{path}' ({exc})") from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValueError(f"model.arch: module '{module_name}' has no callable '{attr}' (from '{path}')")
    model = factory(num_features=spec.num_features, num_classes=spec.num_classes, **kwargs)
    if not isinstance(model, nn.Module):
        raise ValueError(f"model.arch: factory '{path}' returned {type(model).__name__}, expected a torch.nn.Module")
    return model


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


MODEL_FILES = ("model.json", "model.pt")  # what save_model writes: the spec, and the state_dict


def missing_model_file(folder: str | Path) -> str | None:
    """The first of ``MODEL_FILES`` that ``folder`` lacks; None for a complete model folder."""
    return next((name for name in MODEL_FILES if not (Path(folder) / name).is_file()), None)


def read_spec(folder: str | Path) -> ModelSpec:
    """The ``ModelSpec`` in ``folder``'s model.json (without loading any weights)."""
    raw = json.loads((Path(folder) / "model.json").read_text())
    shape = tuple(raw["image_shape"]) if raw.get("image_shape") else None
    return ModelSpec(raw["config"], int(raw["num_features"]), int(raw["num_classes"]), shape, raw.get("factorized"))


def save_model(model: nn.Module, spec: ModelSpec, folder: str | Path) -> Path:
    """Write ``model.pt`` (state_dict) and ``model.json`` (spec) into ``folder``; each file atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / "model.json", lambda p: Path(p).write_text(json.dumps(asdict(spec), indent=2)))
    atomic_write(folder / "model.pt", lambda p: torch.save(model.state_dict(), p))
    return folder


def load_model(folder: str | Path) -> tuple[nn.Module, ModelSpec]:
    """Rebuild from ``model.json`` and load ``model.pt`` with ``weights_only=True``; eval mode."""
    folder = Path(folder)
    if missing := missing_model_file(folder):
        raise FileNotFoundError(f"model folder {folder} lacks {missing}")
    spec = read_spec(folder)
    model = build_model(spec)
    model.load_state_dict(torch.load(folder / "model.pt", map_location="cpu", weights_only=True))
    return model.eval(), spec
