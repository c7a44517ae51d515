"""Model sources: the zoo, Hugging Face folders, user factories; rebuilt from a JSON spec plus weights.

A model's inputs are the data's ``InputContract``: the zoo MLP takes one flat ``input``, the zoo CNNs
an image (flat rows reshaped by ``image_shape``, or ``pixel_values``), a Hugging Face model and a
user factory whatever its ``forward`` names. Models are rebuilt from a small JSON spec plus a
``state_dict`` loaded with ``weights_only=True``: nothing is unpickled, so a checkpoint from elsewhere
cannot run code. A user factory is the one place user code runs, by the user's own choice (its
import path is in their config). A Hugging Face model's spec carries its ``config.json`` content, so a
saved variant rebuilds without the original folder.

Compressed models stay rebuildable from their spec: ``ModelSpec.transforms`` lists the techniques applied,
in order, each with what its replay needs (torch-pruning's history, low-rank layers and their ranks, ...);
``rebuild.build_model`` starts from ``base_model`` here and replays them through the technique registry.
"""

from __future__ import annotations

import importlib
import inspect
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from optforge.tasks.techniques.config import TechniqueConfig
from optforge.tasks.techniques.contract import InputContract, table_contract
from optforge.tasks.techniques.files import atomic_write

ZOO = ("mlp", "cnn", "dscnn")
HUGGINGFACE, ONNX = "huggingface", "onnx"
SOURCES = (*ZOO, HUGGINGFACE, ONNX)


class ModelConfig(TechniqueConfig):
    """Which model: a zoo architecture (shapes from the data), a Hugging Face folder, an ONNX file or a factory."""

    arch: str = Field(
        "mlp", description="'mlp', 'cnn' or 'dscnn' (both need image data), 'huggingface' (a save_pretrained folder "
        "in model.path), 'onnx' (an .onnx file in model.path), or a user factory 'package.module:function'"
    )
    path: str | None = Field(None, description="arch=huggingface: the save_pretrained folder; arch=onnx: the .onnx file")
    weights: str | None = Field(None, description="starting weights for a zoo or factory model: .safetensors, or a "
                                "state_dict file (loaded with weights_only=True)")
    # 2048-2048-1024 (6.4 M params, 26 MB): big enough that matrix work, not Python call overhead,
    # dominates batch-1 latency, so speed-ups of smaller variants mean something.
    hidden: tuple[int, ...] = Field((2048, 2048, 1024), description="MLP hidden layer widths")
    channels: tuple[int, ...] = Field(
        (32, 64), description="CNN conv channels, one 3x3 conv block each (dscnn: stem conv, then one separable block each)"
    )
    dropout: float = Field(0.1, ge=0, lt=1, description="dropout before each hidden Linear's activation output")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments for a user factory")

    @field_validator("arch")
    @classmethod
    def _arch_known(cls, v: str) -> str:
        if v not in SOURCES and ":" not in v:
            raise ValueError(f"expected one of {list(SOURCES)} or an import path 'package.module:factory', got '{v}'")
        return v

    @field_validator("hidden", "channels")
    @classmethod
    def _positive(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v or any(w < 1 for w in v):
            raise ValueError(f"expected a non-empty list of positive widths, got {list(v)}")
        return v

    @model_validator(mode="after")
    def _path_where_needed(self):
        if self.arch in (HUGGINGFACE, ONNX) and not self.path:
            raise ValueError(f"model.path: model.arch={self.arch} needs model.path "
                             f"({'a save_pretrained folder' if self.arch == HUGGINGFACE else 'an .onnx file'})")
        if self.weights and self.arch in (HUGGINGFACE, ONNX):
            raise ValueError(f"model.weights: a {self.arch} model brings its own weights (model.path)")
        return self

    @property
    def is_zoo(self) -> bool:
        return self.arch in ZOO

    @property
    def is_factory(self) -> bool:
        return ":" in self.arch


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a model's architecture (saved next to its weights): where it came from,
    and the techniques applied to it since, in order, each with what its replay needs."""

    config: dict[str, Any]
    contract: dict[str, Any]
    # A Hugging Face model's config.json content (None for other models).
    hf_config: dict[str, Any] | None = None
    # ((technique, params), ...) in the order applied; ``rebuild.build_model`` replays them through the registry.
    transforms: tuple[tuple[str, dict[str, Any]], ...] = ()

    def __post_init__(self):  # JSON and Ray hand back lists; keep one hashable, comparable form
        object.__setattr__(self, "transforms", tuple((str(name), dict(params)) for name, params in self.transforms))

    @property
    def inputs(self) -> InputContract:
        return InputContract.from_dict(self.contract)

    @property
    def num_classes(self) -> int:
        return int(self.contract["num_classes"])

    def then(self, technique: str, params: dict[str, Any]) -> ModelSpec:
        """This spec with one more applied technique."""
        return replace(self, transforms=(*self.transforms, (technique, params)))

    def applied(self, technique: str) -> list[dict[str, Any]]:
        """The params of each time ``technique`` was applied, in order."""
        return [params for name, params in self.transforms if name == technique]

    @property
    def factorized(self) -> dict[str, int] | None:
        """Every low-rank layer (module path -> rank) of a factorized model; None when nothing was factorized."""
        ranks = {k: v for p in self.applied("factorize") for k, v in p["ranks"].items()}
        return ranks or None

    @property
    def pruned(self) -> list[list[Any]] | None:
        """The structured pruning history (pruning, and a student narrowed from its teacher); None: none."""
        history = [step for name, p in self.transforms for step in (p.get("history") or [])
                   if name in ("prune", "distill")]
        return history or None


@dataclass(frozen=True)
class Subject:
    """A model as the plan sees it before anything trains: what a technique's applicability check reads."""

    family: str  # model.arch of its source: a zoo name, huggingface, or a factory's import path
    hf_config: dict[str, Any] | None  # its Hugging Face config (None: not a Hugging Face model)
    contract: InputContract
    build: Callable[[], nn.Module]  # builds it (checks call it on the meta device); may raise


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
        return self.net(x.flatten(1))  # tables are (N, F) already; images (N, C, H, W) become rows


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
    factorization and pruning recognise layers that were already factorized. It keeps the replaced layer's
    geometry as attributes (``in_features``, ``stride``, ...): model code reads them from the layer it built
    (MobileNetV2's TensorFlow-style padding reads ``self.convolution.stride``).
    """

    GEOMETRY = ("in_features", "out_features", "in_channels", "out_channels", "kernel_size", "stride", "padding",
                "dilation", "groups", "padding_mode")

    @classmethod
    def like(cls, layer: nn.Module, rank: int) -> LowRank:
        if isinstance(layer, nn.Linear):
            pair = cls(nn.Linear(layer.in_features, rank, bias=False),
                       nn.Linear(rank, layer.out_features, bias=layer.bias is not None))
        elif isinstance(layer, nn.Conv2d) and layer.kernel_size == (1, 1) and layer.groups == 1:
            pair = cls(nn.Conv2d(layer.in_channels, rank, 1, stride=layer.stride, bias=False),
                       nn.Conv2d(rank, layer.out_channels, 1, bias=layer.bias is not None))
        else:
            raise ValueError(f"factorize: cannot factorize {type(layer).__name__} {layer}; expected Linear or 1x1 Conv2d")
        for name in cls.GEOMETRY:
            if hasattr(layer, name):
                setattr(pair, name, getattr(layer, name))
        return pair


def apply_ranks(model: nn.Module, ranks: dict[str, int]) -> nn.Module:
    """Replace each named layer by a ``LowRank`` pair of that rank (untrained; weights load afterwards)."""
    for path, rank in ranks.items():
        parent_path, _, leaf = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        setattr(parent, leaf, LowRank.like(getattr(parent, leaf), int(rank)))
    return model


def base_model(spec: ModelSpec) -> nn.Module:
    """The (untrained) model a spec starts from, before any applied technique (``rebuild.build_model`` replays
    those). Explicit dispatch: zoo names, Hugging Face, import path."""
    cfg = ModelConfig.from_dict(spec.config)
    contract = spec.inputs
    if cfg.arch == "mlp":
        model = MLP(contract.num_features, spec.num_classes, cfg.hidden, cfg.dropout)
    elif cfg.arch in ("cnn", "dscnn"):
        if contract.image_shape is None:
            raise ValueError(f"model.arch: '{cfg.arch}' needs image data (an image folder, or data.image_shape (C, H, W) "
                             f"for a table of flat images); this data is {contract.kind} with inputs {list(contract.names)}")
        cls = SmallCNN if cfg.arch == "cnn" else DSCNN
        model = cls(contract.image_shape, spec.num_classes, cfg.channels, cfg.dropout)
    elif cfg.arch == HUGGINGFACE:
        from optforge.tasks.techniques.models.hf import from_config

        model = from_config(spec.hf_config or {}, contract)
    elif cfg.arch == ONNX:
        raise ValueError("model.arch: an ONNX model has no PyTorch form; the PyTorch stages are skipped for it")
    else:
        model = _from_factory(cfg.arch, spec, cfg.kwargs)
    return model


def _from_factory(path: str, spec: ModelSpec, kwargs: dict[str, Any]) -> nn.Module:
    """Call the user's factory with ``model.kwargs``, plus the data's shapes where its signature names them
    (``num_classes``, ``num_features``, ``image_shape``, ``contract``): none of them is required."""
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"model.arch: cannot import module '{module_name}' of '{path}' ({exc})") from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValueError(f"model.arch: module '{module_name}' has no callable '{attr}' (from '{path}')")
    contract = spec.inputs
    offered = {"num_classes": spec.num_classes, "image_shape": contract.image_shape, "contract": contract}
    if contract.kind == "table":
        offered["num_features"] = contract.num_features
    params = inspect.signature(factory).parameters
    takes_any = any(p.kind == p.VAR_KEYWORD for p in params.values())
    extra = {k: v for k, v in offered.items() if k in params and k not in kwargs}
    if takes_any and not extra:  # a **kwargs factory written for the old num_features/num_classes call
        extra = {k: v for k, v in offered.items() if k in ("num_classes", "num_features") and k in offered}
    try:
        model = factory(**extra, **kwargs)
    except TypeError as exc:
        raise ValueError(f"model.kwargs: factory '{path}' rejected its arguments {sorted({**extra, **kwargs})} ({exc})") from exc
    if not isinstance(model, nn.Module):
        raise ValueError(f"model.arch: factory '{path}' returned {type(model).__name__}, expected a torch.nn.Module")
    return model


def load_weights_file(path: str | Path, field_name: str = "model.weights") -> dict[str, torch.Tensor]:
    """A state_dict from ``.safetensors`` or a torch file read with ``weights_only=True`` (no code runs)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{field_name}: file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{field_name}: cannot read weights from {path} ({type(exc).__name__}: {exc}); expected "
                         ".safetensors or a state_dict saved with torch.save") from exc


def read_hf_config(folder: str | Path | None) -> dict | None:
    """The ``config.json`` of a Hugging Face model folder, as a dict; None without a folder or that file."""
    path = Path(folder or "") / "config.json"
    return json.loads(path.read_text()) if folder and path.is_file() else None


def num_layers(hf_config: dict | None) -> int | None:
    """A Hugging Face transformer's layer count from its config.json (DistilBERT calls it ``n_layers``)."""
    value = (hf_config or {}).get("num_hidden_layers", (hf_config or {}).get("n_layers"))
    return value if isinstance(value, int) else None


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


MODEL_FILES = ("model.json", "model.pt")  # what save_model writes: the spec, and the state_dict


def missing_model_file(folder: str | Path) -> str | None:
    """The first of ``MODEL_FILES`` that ``folder`` lacks; None for a complete model folder."""
    return next((name for name in MODEL_FILES if not (Path(folder) / name).is_file()), None)


def read_spec(folder: str | Path) -> ModelSpec:
    """The ``ModelSpec`` in ``folder``'s model.json (without loading any weights).

    Specs written before the input contract existed (``num_features``, ``image_shape``) read as tables.
    """
    raw = json.loads((Path(folder) / "model.json").read_text())
    contract = raw.get("contract") or table_contract(int(raw["num_features"]), int(raw["num_classes"]),
                                                     raw.get("image_shape")).to_dict()
    return ModelSpec(raw["config"], contract, raw.get("hf_config"), raw.get("transforms") or _legacy_transforms(raw))


def _legacy_transforms(raw: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """A model.json written before specs kept their transforms in order had one optional field per technique,
    replayed pruned, factorized, circulant, shared layers, early exit: the same steps in that order."""
    found = [("prune", {"history": raw.get("pruned")}), ("factorize", {"ranks": raw.get("factorized")}),
             ("circulant", {"blocks": raw.get("circulant")}), ("distill", {"share_layers": raw.get("shared_layers")})]
    legacy = [(name, params) for name, params in found if next(iter(params.values()))]
    if raw.get("early_exit"):
        legacy.append(("early_exit", dict(raw["early_exit"])))
    return legacy


def save_model(model: nn.Module, spec: ModelSpec, folder: str | Path) -> Path:
    """Write ``model.pt`` (state_dict) and ``model.json`` (spec) into ``folder``; each file atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / "model.json", lambda p: Path(p).write_text(json.dumps(asdict(spec), indent=2)))
    atomic_write(folder / "model.pt", lambda p: torch.save(model.state_dict(), p))
    return folder
