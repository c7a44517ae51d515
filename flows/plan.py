"""What this run can do with this model and data, decided before anything trains.

Given the config and the data's input contract, ``plan`` keeps the chains and steps that apply and
says, for each one it drops, why: the run shows the reasons at its start (log, tags, summary table)
instead of failing after training. It also fills the defaults that depend on the data (the registry
name). Pure: no Prefect, no MLflow.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from flows.chain_config import expand, product_name
from flows.params import PipelineConfig
from tasks.techniques.contract import InputContract
from tasks.techniques.models import ONNX, ModelSpec, build_model
from tasks.techniques.model_source import check_runs


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


def _student_problem(cfg: PipelineConfig, contract: InputContract) -> str | None:
    """Why the configured student cannot take this data, or None."""
    try:
        check_runs(build_model(ModelSpec(cfg.compress.distill.student.to_dict(), contract.to_dict())).eval(), contract)
    except (ValueError, TypeError) as exc:
        return f"distill: the student (compress.distill.student.arch={cfg.compress.distill.student.arch}) " \
               f"cannot take this data: {str(exc)[:200]}"
    return None


def plan(cfg: PipelineConfig, contract: InputContract, data_name: str) -> Plan:
    """The run's plan (module docstring)."""
    skipped: dict[str, str] = {}
    m = cfg.model
    keep = []
    student_problem = None
    for chain in cfg.compress.chains:
        name = product_name(expand(chain), "_")
        if m.arch == ONNX:
            skipped[name] = "model.arch=onnx: no PyTorch model to compress (distill, prune and factorize need one)"
            continue
        if "prune" in chain and cfg.compress.prune.method == "structured" and not m.is_zoo:
            skipped[name] = (f"prune: structured pruning needs a zoo architecture (model.arch={m.arch}); use "
                             "compress.prune.method=unstructured")
            continue
        if "distill" in chain:
            student_problem = student_problem or _student_problem(cfg, contract)
            if student_problem:
                skipped[name] = student_problem
                continue
        keep.append(chain)
    updates: dict = {"compress": cfg.compress.model_copy(update={"chains": tuple(keep)})}
    loader = cfg.train.loader
    if loader.augment_copies and (len(contract.inputs) != 1 or contract.inputs[0].dtype != "float32"):
        skipped["train.loader.augment_copies"] = (f"augmentation perturbs one float input; {contract.kind} data has "
                                                  f"inputs {list(contract.names)}: trained without it")
        updates["train"] = cfg.train.model_copy(update={"loader": loader.model_copy(update={"augment_copies": 0})})
    if m.arch == ONNX:
        skipped["train"] = "model.arch=onnx: the given ONNX model is the FP32 baseline; nothing to train or export"
        skipped["torch_gpu"] = "model.arch=onnx: no PyTorch model to run on CUDA"
    register = {}
    if not cfg.register.model_name:
        register["model_name"] = registry_name(cfg, data_name)
    if m.arch == ONNX and cfg.register.baseline == "pytorch_fp32":
        register["baseline"] = "onnx_fp32"  # the given model, unchanged, is what the goals compare against
    if register:
        updates["register"] = cfg.register.model_copy(update=register)
    return Plan(cfg.model_copy(update=updates), skipped)
