"""Compression chains: distill / prune / factorize, then export and quantize each chain's product.

A chain is a list of stage names applied in order, starting from the trained FP32 teacher, e.g.
``[distill, prune, quantize]``: distill a student, prune it, export it to ONNX and quantize it to
INT8. Each chain's end product becomes a benchmarked variant (and a registration candidate) named
after the chain (``distill_prune_int8``), tagged with its lineage. Chains that share a prefix share
its work: ``[distill, quantize]`` and ``[distill, prune, quantize]`` distill once.

The optimize flow calls ``chain_variants`` after the baseline variants; every step runs through the
flow's StageRunner, so each is cached, timed and logged as a child run like any other stage.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

from pydantic import Field, field_validator, model_validator

from tasks.compress import factorize, prune
from tasks.distill import distill
from tasks.export import export
from tasks.quantize import quantize
from tasks.refs import DataRef, ModelRef
from tasks.techniques.config import TechniqueConfig
from tasks.techniques.distill import DistillConfig
from tasks.techniques.factorize import FactorizeConfig
from tasks.techniques.prune import PruneConfig

Stage = Literal["distill", "prune", "factorize", "export", "quantize"]
TORCH_STEPS = ("distill", "prune", "factorize")
SUFFIX = {"export": "onnx", "quantize": "int8"}

# The default shows each technique next to its INT8 version and keeps `optforge run` quick: one Ray
# Train distillation (shared by the first three chains), in-process fine-tuning for prune and
# factorize, and PyTorch end products that cost only their benchmark. The distilled student alone
# has 1/128 of the teacher's parameters.
DEFAULT_CHAINS = (("distill",), ("distill", "quantize"), ("distill", "prune", "quantize"), ("prune",),
                  ("prune", "quantize"), ("factorize",), ("factorize", "quantize"))


class CompressConfig(TechniqueConfig):
    """Which compression chains to build and each technique's settings."""

    chains: tuple[tuple[Stage, ...], ...] = Field(
        DEFAULT_CHAINS, description="chains of stages (distill, prune, factorize, then export and/or quantize); "
        "each chain's end product is a benchmarked variant; [] builds none"
    )
    distill: DistillConfig = Field(default_factory=DistillConfig, description="knowledge distillation (Ray Train)")
    prune: PruneConfig = Field(default_factory=PruneConfig, description="pruning and its fine-tuning")
    factorize: FactorizeConfig = Field(default_factory=FactorizeConfig, description="SVD factorization and fine-tuning")

    @field_validator("chains")
    @classmethod
    def _chains_make_sense(cls, chains):
        seen = set()
        for i, chain in enumerate(chains):
            where = f"chain {i} {list(chain)}"
            if not any(step in TORCH_STEPS for step in chain):
                raise ValueError(f"{where} needs at least one of {list(TORCH_STEPS)}; export/quantize alone repeat "
                                 "the baseline variants")
            if len(set(chain)) != len(chain):
                raise ValueError(f"{where} repeats a stage")
            if "distill" in chain and chain[0] != "distill":
                raise ValueError(f"{where}: distill trains a new student from the teacher, so it must come first")
            first_onnx = next((j for j, step in enumerate(chain) if step in SUFFIX), len(chain))
            if tuple(chain[first_onnx:]) not in ((), ("export",), ("quantize",), ("export", "quantize")):
                raise ValueError(f"{where}: export and quantize must come last, export before quantize")
            if expand(chain) in seen:
                raise ValueError(f"{where} builds the same variant as an earlier chain")
            seen.add(expand(chain))
        return chains

    @model_validator(mode="after")
    def _no_structured_prune_after_factorize(self):
        for chain in self.chains:
            if "factorize" in chain and "prune" in chain and chain.index("prune") > chain.index("factorize") \
                    and self.prune.method == "structured":
                raise ValueError(f"compress.chains: {list(chain)} prunes structurally after factorizing, which is "
                                 "not supported; put prune before factorize or use prune.method=unstructured")
        return self


def expand(chain) -> tuple[str, ...]:
    """The steps that actually run: quantize needs an ONNX model, so it implies export."""
    steps = tuple(chain)
    if "quantize" in steps and "export" not in steps:
        steps = steps[:-1] + ("export", "quantize")
    return steps


def product_name(steps: tuple[str, ...], sep: str = "-") -> str:
    """``('distill', 'prune', 'export', 'quantize')`` -> ``distill-prune-int8``."""
    parts = [s for s in steps if s in TORCH_STEPS] + ([SUFFIX[steps[-1]]] if steps[-1] in SUFFIX else [])
    return sep.join(parts)


def _run_step(step: str, source: ModelRef, name: str, teacher: ModelRef, cfg: CompressConfig, data: DataRef,
              workdir: str, stage, export_cfg, quantize_cfg) -> ModelRef:
    """One chain step through ``stage``; the task is renamed to its product so each gets its own stage tags."""
    if step == "distill":
        return stage(distill.with_options(name=name), cfg=cfg.distill, teacher=teacher, data=data, workdir=workdir,
                     run_name=name)
    if step in ("prune", "factorize"):
        task, step_cfg = (prune, cfg.prune) if step == "prune" else (factorize, cfg.factorize)
        return stage(task.with_options(name=name), cfg=step_cfg, model=source, teacher=teacher, data=data,
                     workdir=workdir, run_name=name)
    if step == "export":
        out = stage(export.with_options(name=name), cfg=export_cfg, model=source, data=data, workdir=workdir)
    else:
        out = stage(quantize.with_options(name=name), cfg=quantize_cfg, onnx_model=source, workdir=workdir)
    # ONNX files carry no FLOP count of their own: keep the PyTorch source's counts with the ONNX facts.
    return replace(out, info={**source.info, **out.info})


def chain_variants(cfg: CompressConfig, teacher: ModelRef, data: DataRef, workdir: str, stage,
                   export_cfg, quantize_cfg) -> list[ModelRef]:
    """Run each configured chain through ``stage`` (the flow's StageRunner); return the end products.

    Each variant's ``info["lineage"]`` becomes MLflow tags on its benchmark run: the chain, the run
    that made the model it was derived from (``parent_run``), every step's run and the teacher's run.
    """
    products: dict[tuple[str, ...], ModelRef] = {}
    variants = []
    for chain in cfg.chains:
        steps, ref, parent = expand(chain), teacher, teacher
        for i, step in enumerate(steps):
            key = steps[: i + 1]
            if key not in products:
                products[key] = _run_step(step, ref, product_name(key), teacher, cfg, data, workdir, stage,
                                          export_cfg, quantize_cfg)
            parent, ref = ref, products[key]
        lineage = {"chain": ">".join(chain), "parent_run": parent.run_id or "", "teacher_run": teacher.run_id or "",
                   "chain_runs": ",".join(f"{s}:{products[steps[: i + 1]].run_id}" for i, s in enumerate(steps))}
        variants.append(replace(ref, name=product_name(steps, "_"), info={**ref.info, "lineage": lineage}))
    return variants
