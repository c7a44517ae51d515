"""The technique registry: one record per technique, read by everything that needs to know what one is.

(Not MLflow's Model Registry, which ``tasks/stages/register.py`` writes to.) A record says what a technique is:
its name, its config class and where that sits in the pipeline config, the form of model it takes and
the form it gives, its word in variant names, whether its output belongs to the
machine that built it, the values ``optforge tune`` tries by default, how to replay its change on a fresh
model (``models/rebuild.py``), and why it cannot apply to a model (the plan asks before anything trains).
The chain config, the chain runner, the plan, the tune search, the cache key and the model rebuild read
these records instead of keeping their own tables.

A chain is valid when each step takes the form the step before gives, as Olive matches its passes'
model handlers: ``distill`` takes only the trained teacher (so it comes first), nothing takes an INT8
model (so INT8 comes last), an early-exit model goes only to the export that keeps its routing, and
``quantize`` or ``static`` right after a PyTorch model is bridged by an implied ``export``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Literal

import torch
from torch import nn

from optforge.tasks.techniques.compression import graph_prune
from optforge.tasks.techniques.compression.binarize import BinarizeConfig
from optforge.tasks.techniques.compression.circulant import CirculantConfig, apply_blocks
from optforge.tasks.techniques.compression.cluster import ClusterConfig
from optforge.tasks.techniques.compression.distill import DistillConfig
from optforge.tasks.techniques.compression.early_exit import EarlyExitConfig, EarlyExitModel
from optforge.tasks.techniques.compression.factorize import FactorizeConfig
from optforge.tasks.techniques.compression.prune import PruneConfig
from optforge.tasks.techniques.compression.qat import QatConfig
from optforge.tasks.techniques.compression.students import share_layers, student_problem
from optforge.tasks.techniques.config import TechniqueConfig
from optforge.tasks.techniques.contract import InputContract
from optforge.tasks.techniques.engines.tensorrt import TensorRTConfig
from optforge.tasks.techniques.engines.tvm import TvmConfig
from optforge.tasks.techniques.models.exit_blocks import blocks_of
from optforge.tasks.techniques.models.models import Subject, apply_ranks
from optforge.tasks.techniques.onnx.export import ExportConfig
from optforge.tasks.techniques.onnx.fp16 import Fp16Config
from optforge.tasks.techniques.onnx.fuse import FuseConfig, unsupported_reason
from optforge.tasks.techniques.onnx.quantize import DynamicQuantConfig
from optforge.tasks.techniques.onnx.static import StaticQuantConfig


class Form(str, Enum):
    """The form of model a step takes or gives: what decides which step may follow which."""

    TEACHER = "teacher"  # the trained FP32 PyTorch model every chain starts from
    TORCH = "pytorch"  # a PyTorch model derived from it
    CIRCULANT = "pytorch_circulant"  # FFT layers: exit heads or an ONNX step may follow, not weight pruning
    EXITS = "pytorch_early_exit"  # with exit heads: only the export that keeps their routing may follow
    ONNX = "onnx"  # FP32 ONNX
    FUSED = "onnx_fused"  # ONNX Runtime's transformer fusion, exported from PyTorch in one step
    ROUTED = "onnx_early_exit"  # an early-exit model's ONNX, its routing in If nodes
    INT8 = "onnx_int8"  # INT8 ONNX: the end of a chain
    ENGINE = "engine"  # a runtime's own compiled form (TensorRT, TVM)

    def __str__(self) -> str:
        return self.value


_PYTORCH = (Form.TEACHER, Form.TORCH)  # what the weight-level PyTorch steps take


@dataclass(frozen=True)
class Technique:
    """One technique. ``io`` maps each form it takes to the form it gives."""

    name: str  # its one name: the step in compress.chains, the stage (Prefect task, MLflow run, cache folder), the module
    config: type[TechniqueConfig]
    config_key: str  # where its settings live in the pipeline config (dotted)
    io: Mapping[Form, Form]
    # Its word in a variant's name: what the model it gives *is* ("int8", "fused"), where the name says what
    # the step *does*. Variant names are what MLflow history, the registry's versions and `bench --compare`
    # key on, so they keep the words they have always had.
    word: str
    named: Literal["always", "last"]  # "last": the word shows only when the step ends the chain
    summary: str
    machine_bound: bool = False  # its output belongs to the machine that built it (cache keyed by that machine)
    search: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)  # tune's default values, keys under config_key
    chain_step: bool = True  # False: an engine, built from the baseline's ONNX outside the chains
    # Rebuilds its change on a freshly built model from the params it recorded in ModelSpec.transforms (the
    # weights load afterwards); None: it changes weights only, or gives no PyTorch model.
    replay: Callable[[nn.Module, dict[str, Any], InputContract], nn.Module] | None = None
    # Why it cannot apply, with these settings, to the model a chain would give it (a reason to skip the
    # chain), or None.
    applies: Callable[[Subject, Any], str | None] | None = None

    def takes(self, form: Form) -> bool:
        return form in self.io


def _replay_prune(model: nn.Module, params: dict[str, Any], contract: InputContract) -> nn.Module:
    return graph_prune.replay(model, contract, params["history"])


def _replay_distill(model: nn.Module, params: dict[str, Any], contract: InputContract) -> nn.Module:
    """A student derived from the teacher: narrowed (a pruning history) and/or sharing its layers."""
    if params.get("history"):
        graph_prune.replay(model, contract, params["history"])
    if params.get("share_layers"):
        share_layers(model, int(params["share_layers"]))
    return model


def _replay_early_exit(model: nn.Module, params: dict[str, Any], contract: InputContract) -> nn.Module:
    return EarlyExitModel(model, params["exits"], contract.num_classes, contract.example(batch=1), params["threshold"])


def _early_exit_applies(subject: Subject, cfg: EarlyExitConfig) -> str | None:
    if ":" in subject.family:
        return (f"early_exit: the step cannot see blocks in a factory model ({subject.family}); exit heads go on the "
                "zoo MLP, CNN and DSCNN and on BERT-style Hugging Face classifiers")
    try:
        with torch.device("meta"):
            model = subject.build()
    except Exception:  # cannot be built here (a factory reading files): the stage itself will say
        return None
    try:
        blocks_of(model)
    except ValueError as exc:
        return str(exc)
    return None


TECHNIQUES: dict[str, Technique] = {t.name: t for t in (
    Technique("distill", DistillConfig, "compress.distill", {Form.TEACHER: Form.TORCH}, "distill", "always",
              "train a smaller student from the teacher's soft labels (Ray Train)", replay=_replay_distill,
              applies=student_problem),
    Technique("prune", PruneConfig, "compress.prune", dict.fromkeys(_PYTORCH, Form.TORCH), "prune", "always",
              "remove channels, heads or weights by importance, then fine-tune",
              search={"sparsity": (0.3, 0.5, 0.7), "rounds": (1, 2)}, replay=_replay_prune),
    Technique("factorize", FactorizeConfig, "compress.factorize", dict.fromkeys(_PYTORCH, Form.TORCH), "factorize",
              "always", "replace large layers by two low-rank ones (truncated SVD), then fine-tune",
              search={"energy": (0.4, 0.6, 0.8)}, replay=lambda model, p, _: apply_ranks(model, p["ranks"])),
    Technique("cluster", ClusterConfig, "compress.cluster", dict.fromkeys(_PYTORCH, Form.TORCH), "cluster", "always",
              "share 2**bits values per layer (k-means), stored bit-packed"),
    Technique("binarize", BinarizeConfig, "compress.binarize", dict.fromkeys(_PYTORCH, Form.TORCH), "binarize",
              "always", "binary inner-layer weights (sign x channel scale), one bit each"),
    Technique("circulant", CirculantConfig, "compress.circulant", dict.fromkeys(_PYTORCH, Form.CIRCULANT),
              "circulant", "always", "block-circulant Linear layers computed by FFT",
              replay=lambda model, p, _: apply_blocks(model, p["blocks"])),
    Technique("early_exit", EarlyExitConfig, "compress.early_exit",
              dict.fromkeys((*_PYTORCH, Form.CIRCULANT), Form.EXITS), "early_exit", "always",
              "exit heads after intermediate blocks; a confident sample stops early", replay=_replay_early_exit,
              applies=_early_exit_applies),
    Technique("export", ExportConfig, "onnx.export",
              {**dict.fromkeys((*_PYTORCH, Form.CIRCULANT), Form.ONNX), Form.EXITS: Form.ROUTED}, "onnx", "last",
              "ONNX export from the input contract, checked against PyTorch"),
    Technique("fuse", FuseConfig, "onnx.fuse", dict.fromkeys((*_PYTORCH, Form.CIRCULANT), Form.FUSED), "fused", "always",
              "ONNX Runtime's transformer fusion (attention, LayerNorm, GELU)",
              applies=lambda subject, _: unsupported_reason(subject.hf_config)),
    Technique("quantize", DynamicQuantConfig, "onnx.quantize", dict.fromkeys((Form.ONNX, Form.FUSED, Form.ROUTED), Form.INT8),
              "int8", "last", "dynamic INT8: weights INT8, activations quantized per call"),
    Technique("static", StaticQuantConfig, "onnx.static", {Form.ONNX: Form.INT8}, "static_int8", "last",
              "static INT8 (QDQ), activations calibrated on training rows",
              search={"method": ("minmax", "percentile"), "per_channel": (False, True)}),
    Technique("qat", QatConfig, "compress.qat", dict.fromkeys((*_PYTORCH, Form.CIRCULANT), Form.INT8), "qat_int8",
              "last", "quantization-aware fine-tuning, exported as QDQ INT8"),
    Technique("fp16", Fp16Config, "onnx.fp16", {Form.ONNX: Form.ONNX}, "fp16", "last", "FP16 ONNX for GPU runtimes",
              chain_step=False),
    Technique("tensorrt", TensorRTConfig, "engines.tensorrt", {Form.ONNX: Form.ENGINE}, "tensorrt", "last",
              "TensorRT FP16/INT8 engines (needs CUDA)", machine_bound=True, chain_step=False),
    Technique("tvm", TvmConfig, "engines.tvm", {Form.ONNX: Form.ENGINE}, "tvm", "last",
              "Apache TVM CPU libraries, tuned for this CPU", machine_bound=True, chain_step=False),
)}

CHAIN_STEPS = tuple(name for name, t in TECHNIQUES.items() if t.chain_step)
# The steps the baseline variants already apply to the teacher: a chain of these alone repeats a baseline.
BASELINE_STEPS = ("export", "fuse", "quantize", "static")
# Stages whose output belongs to the machine: the engines, and the benchmark's timings (a measurement, not
# a technique, so it has no record).
MACHINE_BOUND_STAGES = frozenset({"benchmark", *(t.name for t in TECHNIQUES.values() if t.machine_bound)})


def _needs_export(name: str, form: Form) -> bool:
    """Whether step ``name`` cannot take ``form`` but can take its export (INT8 after a PyTorch step)."""
    export = TECHNIQUES["export"]
    return not TECHNIQUES[name].takes(form) and export.takes(form) and TECHNIQUES[name].takes(export.io[form])


def expand(chain) -> tuple[str, ...]:
    """The steps that actually run: a step that cannot take a PyTorch model but can take its export (INT8)
    gets an ``export`` before it. ``('prune', 'quantize')`` -> ``('prune', 'export', 'quantize')``."""
    steps: list[str] = []
    form = Form.TEACHER
    for name in chain:
        if _needs_export(name, form):
            steps.append("export")
            form = TECHNIQUES["export"].io[form]
        steps.append(name)
        form = TECHNIQUES[name].io.get(form, form)
    return tuple(steps)


def chain_problem(chain) -> str | None:
    """Why ``chain`` is not a valid chain (the step that cannot take what the step before gives), or None."""
    if not chain:
        return "is empty"
    unknown = [s for s in chain if s not in CHAIN_STEPS]
    if unknown:
        return f"has unknown steps {unknown}; steps: {list(CHAIN_STEPS)}"
    if len(set(chain)) != len(chain):
        return "repeats a step"
    if all(s in BASELINE_STEPS for s in chain):
        return (f"needs at least one of {[s for s in CHAIN_STEPS if s not in BASELINE_STEPS]}; "
                f"{'/'.join(BASELINE_STEPS)} alone repeat the baseline variants")
    form, before = Form.TEACHER, "the teacher"
    for name in expand(chain):
        step = TECHNIQUES[name]
        if not step.takes(form):
            after = ", ".join(s for s in CHAIN_STEPS if TECHNIQUES[s].takes(form) or _needs_export(s, form)) or "nothing"
            return (f"{name} cannot follow {before}: {name} takes {' or '.join(map(str, step.io))}, {before} gives "
                    f"{form} (what may follow it: {after})")
        form, before = step.io[form], name
    return None


def variant_name(steps, sep: str = "-") -> str:
    """``('distill', 'prune', 'export', 'quantize')`` -> ``distill-prune-int8``: every step whose word shows
    always (the PyTorch steps, and ``fused`` so a fused chain never shares a name with its unfused twin), and
    the last step's word."""
    steps = tuple(steps)
    return sep.join(TECHNIQUES[s].word for i, s in enumerate(steps)
                    if TECHNIQUES[s].named == "always" or i == len(steps) - 1)


def section(cfg: Any, technique: Technique) -> TechniqueConfig:
    """The technique's settings in a pipeline config: the section at its ``config_key``."""
    value = cfg
    for part in technique.config_key.split("."):
        value = getattr(value, part)
    return value
