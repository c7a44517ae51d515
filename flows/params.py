"""The pipeline's one typed config: a nested config per stage, loaded from YAML plus ``--set`` overrides.

``configs/default.yaml`` spells out the defaults below (a test keeps the two equal). Errors name the
field: ``config error: train.lr: Input should be greater than 0 (got -0.1)``.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, model_validator

from optforge.flows.chain_config import CompressConfig
from optforge.flows.engines import EnginesConfig
from optforge.flows.onnx_config import OnnxConfig
from optforge.flows.tune_config import TuneConfig
from optforge.tasks.techniques.config import TechniqueConfig
from optforge.tasks.techniques.data.data import DataConfig
from optforge.tasks.techniques.measurement.benchmark import BenchmarkConfig
from optforge.tasks.techniques.measurement.selection import RegisterConfig
from optforge.tasks.techniques.models.models import ModelConfig
from optforge.tasks.techniques.training.training import TrainConfig


class ConfigError(ValueError):
    """A config file, override or value that cannot be used; the message names the field or file."""


class TrackingConfig(TechniqueConfig):
    """Where results go (the tracking server itself comes from MLFLOW_TRACKING_URI)."""

    experiment: str = Field("optforge", min_length=1, description="MLflow experiment of the pipeline runs")
    workdir: str = Field(".optforge", description="local folder for stage outputs, Ray results and cache records")


# The stage is called "register" everywhere; pydantic warns that the name shadows ABCMeta.register,
# which nothing here uses on a config instance.
warnings.filterwarnings("ignore", message='Field name "register" in "PipelineConfig"', category=UserWarning)


class PipelineConfig(TechniqueConfig):
    """Everything one ``optforge run`` does."""

    RENAMED = {"export": "onnx.export", "fuse": "onnx.fuse", "quantize": "onnx.quantize"}

    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="experiment and work folder")
    data: DataConfig = Field(default_factory=DataConfig, description="dataset and split")
    model: ModelConfig = Field(default_factory=ModelConfig, description="the FP32 model to train")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Ray Train data-parallel training")
    onnx: OnnxConfig = Field(default_factory=OnnxConfig, description="ONNX transforms: export, fusion, dynamic and "
                             "static INT8, FP16")
    engines: EnginesConfig = Field(default_factory=EnginesConfig, description="engines: TensorRT, TVM, PyTorch on GPU")
    compress: CompressConfig = Field(default_factory=CompressConfig, description="distill/prune/factorize chains")
    benchmark: BenchmarkConfig = Field(default_factory=BenchmarkConfig, description="latency/throughput settings")
    register: RegisterConfig = Field(default_factory=RegisterConfig, description="selection gate and registry name")
    tune: TuneConfig = Field(default_factory=TuneConfig, description="the search of optforge tune: chains, settings, "
                             "budget")

    @model_validator(mode="after")
    def _cross_section(self):
        if self.train.mix == "tail" and not self.data.new_source:
            raise ValueError("train.mix: 'tail' mixes data.new_source into the end of each epoch; set data.new_source")
        if self.compress.distill.train.init_from:
            raise ValueError("compress.distill.train.init_from: students start fresh; use train.init_from for the teacher")
        m = self.model
        if self.train.epochs == 0 and not (m.arch in ("huggingface", "onnx") or m.weights or self.train.init_from):
            raise ValueError(f"train.epochs: 0 takes the given model as the FP32 baseline, but model.arch={m.arch} has "
                             "no trained weights; set model.weights, model.arch=huggingface with model.path, "
                             "model.arch=onnx, or train.init_from")
        if self.train.kl_weight and not self.train.init_from:
            raise ValueError("train.kl_weight: the KL term keeps a fine-tuned model close to the model it started from; "
                             "set train.init_from (the original model) or leave kl_weight at 0")
        if m.arch == "onnx" and self.train.init_from:
            raise ValueError("train.init_from: an ONNX model (model.arch=onnx) cannot be fine-tuned")
        if self.data.new_source and (self.data.text_column or Path(self.data.source).is_dir()):
            raise ValueError("data.new_source: new data for fine-tuning is supported for numeric tables only")
        return self


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path}: expected a mapping of sections, got {type(raw).__name__}")
    return raw


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``KEY=VALUE`` overrides (dotted keys; values parsed as YAML, so ``3`` is an int)."""
    raw = _copy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.epochs=3")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {key}: cannot parse value {text!r} ({exc})") from exc
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {key}: '{part}' is a value, not a section")
            node = child
        node[parts[-1]] = value
    return raw


def _copy(d: Any) -> Any:
    return {k: _copy(v) for k, v in d.items()} if isinstance(d, dict) else d


def validate(raw: dict[str, Any]) -> PipelineConfig:
    """Validate a raw dict; pydantic's errors become one ``ConfigError`` naming each bad field."""
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            field = ".".join(str(p) for p in err["loc"])
            if not field:  # a check across sections: its message names the fields itself
                lines.append(str(err["msg"]).removeprefix("Value error, "))
            elif err["type"] == "extra_forbidden":
                lines.append(f"{field}: unknown key")
            else:
                lines.append(f"{field}: {err['msg']} (got {err.get('input')!r})")
        raise ConfigError("config error: " + "; ".join(lines)) from None


def _base(path: str | Path | None, typed: PipelineConfig | None) -> dict[str, Any]:
    if typed is not None and path:
        raise ConfigError(f"config and config_path ({path}): give the pipeline config one way, not both")
    return typed.to_dict() if typed is not None else (read_yaml(path) if path else {})


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                typed: PipelineConfig | None = None) -> PipelineConfig:
    """Defaults, then the YAML file or the typed config (if any), then the overrides, validated."""
    return validate(apply_overrides(_base(path, typed), list(overrides or [])))


def peek_tracking(path: str | Path | None, overrides: list[str] | None,
                  typed: PipelineConfig | None = None) -> TrackingConfig:
    """The tracking section, read leniently, so that even a broken config's failure is recorded
    in its experiment and the CLI can say where stage outputs were kept."""
    try:
        raw = apply_overrides(_base(path, typed), list(overrides or []))
        return TrackingConfig.model_validate(raw.get("tracking") or {})
    except Exception:
        return TrackingConfig()
