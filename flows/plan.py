"""What this run can do with this model and data, decided before anything trains.

Given the config and the data's input contract, ``plan`` keeps the chains and steps that apply and
says, for each one it drops, why: the run shows the reasons at its start (log, tags, summary table)
instead of failing after training. It also fills the defaults that depend on the data (the registry
name). Pure: no Prefect, no MLflow.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from optforge.flows.chain_config import expand, product_name
from optforge.flows.params import ConfigError, PipelineConfig
from optforge.tasks.techniques.compression.early_exit import check_exits
from optforge.tasks.techniques.contract import InputContract
from optforge.tasks.techniques.engines.tvm import unavailable_reason as tvm_unavailable
from optforge.tasks.techniques.models.exit_blocks import blocks_of
from optforge.tasks.techniques.models.models import HUGGINGFACE, ONNX, ModelSpec, read_hf_config
from optforge.tasks.techniques.models.rebuild import build_model
from optforge.tasks.techniques.registry import TECHNIQUES, Subject, section


@dataclass(frozen=True)
class Plan:
    """The config to run (chains filtered, data-dependent defaults filled) and what was skipped, with why."""

    cfg: PipelineConfig
    skipped: dict[str, str] = field(default_factory=dict)  # variant or step -> reason


def registry_name(cfg: PipelineConfig, data_name: str) -> str:
    """``optforge-<data>`` for the zoo, ``optforge-<data>-<model>`` for a user's model: one name per kind of
    data and model, so the champion/challenger rule never compares models of different inputs."""
    m = cfg.model
    model = "" if m.is_zoo else (m.arch.rpartition(":")[2] if m.is_factory else (m.path or m.arch).rstrip("/"))
    model = re.sub(r".*/", "", model).removesuffix(".onnx")
    raw = "-".join(p for p in ("optforge", data_name, model) if p)
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", raw)[:128]


def _teacher_builder(cfg: PipelineConfig, contract: InputContract):
    m = cfg.model
    if m.arch == HUGGINGFACE:
        from optforge.tasks.techniques.models.hf import from_config

        return lambda: from_config(read_hf_config(m.path) or {}, contract)
    return lambda: build_model(ModelSpec(m.to_dict(), contract.to_dict()))


def _check_circulant(cfg: PipelineConfig, contract: InputContract) -> None:
    """Raise ``ConfigError`` (before anything trains) when compress.circulant cannot apply to the teacher."""
    from optforge.tasks.techniques.compression.circulant import chosen_layers

    try:
        with torch.device("meta"):
            teacher = _teacher_builder(cfg, contract)()
    except Exception:
        return  # cannot be built here (a factory reading files): the stage itself will say
    try:
        chosen_layers(teacher, cfg.compress.circulant)
    except ValueError as exc:
        raise ConfigError(f"config error: {exc}") from None


def _subject(cfg: PipelineConfig, contract: InputContract, chain) -> Subject:
    """The model a chain's steps after ``distill`` (or all of them, without it) are given: the configured
    student when distill trains its own, else the model (or a student derived from it)."""
    distill = cfg.compress.distill
    own_student = "distill" in chain and distill.derive == "none"
    source = distill.student if own_student else cfg.model
    build = (lambda: build_model(ModelSpec(source.to_dict(), contract.to_dict()))) if own_student \
        else _teacher_builder(cfg, contract)
    return Subject(source.arch, _fused_config(cfg, chain), contract, build)


def _check_exits(cfg: PipelineConfig, subject: Subject, chain) -> None:
    """Raise ``ConfigError`` when compress.early_exit.exits does not fit the blocks of the model it goes on."""
    if "distill" in chain and cfg.compress.distill.derive != "width":
        return  # a new student's blocks are not the teacher's (a derived-by-width student keeps them)
    try:
        with torch.device("meta"):
            count = len(blocks_of(subject.build()).blocks)
    except Exception:
        return  # cannot be built or cut here: the step's own check (a skip reason) or the stage will say
    try:
        check_exits(cfg.compress.early_exit.exits, count)
    except ValueError as exc:
        raise ConfigError(f"config error: {exc}") from None


def _fused_config(cfg: PipelineConfig, chain) -> dict | None:
    """The Hugging Face config of the model a chain's fuse step exports (None: not a Hugging Face model)."""
    m, distill = cfg.model, cfg.compress.distill
    if "distill" in chain and distill.derive == "none":
        student = distill.student
        return read_hf_config(student.path) if student.arch == HUGGINGFACE and student.path else None
    return read_hf_config(m.path) if m.arch == HUGGINGFACE and m.path else None  # the model, or derived from it


def plan(cfg: PipelineConfig, contract: InputContract, data_name: str) -> Plan:
    """The run's plan (module docstring)."""
    skipped: dict[str, str] = {}
    m = cfg.model
    keep = []
    updates: dict = {}
    teacher = _subject(cfg, contract, ())
    if cfg.onnx.fuse.enabled and (reason := TECHNIQUES["fuse"].applies(teacher, cfg.onnx.fuse)):
        skipped["fuse"] = reason
        updates["onnx"] = cfg.onnx.model_copy(update={"fuse": cfg.onnx.fuse.model_copy(update={"enabled": False})})
    for chain in cfg.compress.chains:
        name = product_name(expand(chain), "_")
        if m.arch == ONNX:
            skipped[name] = "model.arch=onnx: no PyTorch model to compress (distill, prune, factorize, cluster and binarize need one)"
            continue
        subject = _subject(cfg, contract, chain)
        # Each step's record says why it cannot apply to the model it would get (distill: the teacher).
        reasons = (TECHNIQUES[step].applies(teacher if step == "distill" else subject, section(cfg, TECHNIQUES[step]))
                   for step in chain if TECHNIQUES[step].applies)
        if reason := next((r for r in reasons if r), None):
            skipped[name] = reason
            continue
        if chain[0] == "circulant":  # a block that does not divide the teacher's widths is the user's error
            _check_circulant(cfg, contract)
        if "early_exit" in chain:
            _check_exits(cfg, subject, chain)
        keep.append(chain)
    updates["compress"] = cfg.compress.model_copy(update={"chains": tuple(keep)})
    loader = cfg.train.loader
    if loader.augment_copies and (len(contract.inputs) != 1 or contract.inputs[0].dtype != "float32"):
        skipped["train.loader.augment_copies"] = (f"augmentation perturbs one float input; {contract.kind} data has "
                                                  f"inputs {list(contract.names)}: trained without it")
        updates["train"] = cfg.train.model_copy(update={"loader": loader.model_copy(update={"augment_copies": 0})})
    if m.arch == ONNX:
        skipped["train"] = "model.arch=onnx: the given ONNX model is the FP32 baseline; nothing to train or export"
        skipped["torch_gpu"] = "model.arch=onnx: no PyTorch model to run on CUDA"
    if cfg.engines.tvm.enabled and (reason := tvm_unavailable()):
        skipped["tvm"] = reason
        updates["engines"] = cfg.engines.model_copy(update={"tvm": cfg.engines.tvm.model_copy(update={"enabled": False})})
    register = {}
    if not cfg.register.model_name:
        register["model_name"] = registry_name(cfg, data_name)
    if m.arch == ONNX and cfg.register.baseline == "pytorch_fp32":
        register["baseline"] = "onnx_fp32"  # the given model, unchanged, is what the goals compare against
    if register:
        updates["register"] = cfg.register.model_copy(update=register)
    return Plan(cfg.model_copy(update=updates), skipped)
