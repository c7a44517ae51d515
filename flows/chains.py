"""Compression chains: each chain's steps run in order on the trained teacher, each through its task shell.

A chain is a list of the registry's chain steps applied in order, starting from the trained FP32 teacher, e.g.
``[distill, prune, quantize]``: distill a student, prune it, export it to ONNX and quantize it to
INT8. Each chain's end product becomes a benchmarked variant (and a registration candidate) named
after the chain (``distill_prune_int8``), tagged with its lineage. Chains that share a prefix share
its work: ``[distill, quantize]`` and ``[distill, prune, quantize]`` distill once.

The optimize flow calls ``chain_variants`` after the baseline variants; every step runs through the
flow's StageRunner, so each is cached, timed and logged as a child run like any other stage.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from optforge.flows.chain_config import CompressConfig, expand, product_name
from optforge.flows.isolation import failed_variants
from optforge.tasks.runtime.refs import DataRef, ModelRef
from optforge.tasks.stages.compress import binarize_weights, circulant, cluster_weights, factorize, prune, qat
from optforge.tasks.stages.distill import distill
from optforge.tasks.stages.early_exit import early_exit
from optforge.tasks.stages.export import export
from optforge.tasks.stages.fuse import fuse_onnx
from optforge.tasks.stages.quantize import quantize
from optforge.tasks.stages.static import quantize_static
from optforge.tasks.techniques.compression.qat import settled_reduce_range
from optforge.tasks.techniques.registry import TECHNIQUES, section

__all__ = ["CompressConfig", "RUNS", "chain_variants", "expand", "product_name"]


@dataclass(frozen=True)
class Step:
    """What one chain step runs with: its settings, the model before it, and the run's context."""

    stage: Any  # the flow's StageRunner
    name: str  # the product's name: the task and its MLflow run are named after it
    cfg: Any  # the technique's section of the pipeline config
    source: ModelRef
    teacher: ModelRef
    data: DataRef
    workdir: str


def _finetuned(task) -> Callable[[Step], ModelRef]:
    """A PyTorch step that changes the model and fine-tunes it, distilling from the teacher."""
    return lambda s: s.stage(task.with_options(name=s.name), cfg=s.cfg, model=s.source, teacher=s.teacher,
                             data=s.data, workdir=s.workdir, run_name=s.name)


def _keeps_counts(run: Callable[[Step], ModelRef]) -> Callable[[Step], ModelRef]:
    """An ONNX step: ONNX files carry no FLOP count of their own, so keep the source's counts with its facts."""
    def step(s: Step) -> ModelRef:
        out = run(s)
        return replace(out, info={**s.source.info, **out.info})
    return step


def _qat(s: Step) -> ModelRef:
    """QAT with its weight range settled before the task runs: unset, it follows this machine's CPU, and the
    settled value goes into the cache key and the MLflow params (a workdir shared by a VNNI machine and one
    without must not hand the second an 8-bit model its kernels saturate on)."""
    settled = s.cfg.model_copy(update={"reduce_range": settled_reduce_range(s.cfg.reduce_range)})
    return _finetuned(qat)(replace(s, cfg=settled))


# Explicit dispatch: each chain step of the registry to its task shell
# (tests/flows/test_technique_registry.py checks that the two name the same steps).
RUNS: dict[str, Callable[[Step], ModelRef]] = {
    "distill": lambda s: s.stage(distill.with_options(name=s.name), cfg=s.cfg, teacher=s.teacher, data=s.data,
                                 workdir=s.workdir, run_name=s.name),
    "prune": _finetuned(prune),
    "factorize": _finetuned(factorize),
    "cluster": _finetuned(cluster_weights),
    "binarize": _finetuned(binarize_weights),
    "circulant": _finetuned(circulant),
    "early_exit": _finetuned(early_exit),
    "qat": _qat,
    "export": _keeps_counts(lambda s: s.stage(export.with_options(name=s.name), cfg=s.cfg, model=s.source,
                                              data=s.data, workdir=s.workdir)),
    "fuse": _keeps_counts(lambda s: s.stage(fuse_onnx.with_options(name=s.name), cfg=s.cfg, model=s.source,
                                            data=s.data, workdir=s.workdir, run_name=s.name)),
    "quantize": _keeps_counts(lambda s: s.stage(quantize.with_options(name=s.name), cfg=s.cfg, onnx_model=s.source,
                                                workdir=s.workdir)),
    "static": _keeps_counts(lambda s: s.stage(quantize_static.with_options(name=s.name), cfg=s.cfg,
                                              onnx_model=s.source, data=s.data, workdir=s.workdir)),
}


def chain_variants(cfg, teacher: ModelRef, data: DataRef, workdir: str, stage, isolate: bool = True) -> list[ModelRef]:
    """Run each of ``cfg.compress.chains`` (``cfg``: the pipeline config) through ``stage`` (the flow's
    StageRunner); return the end products. Each step reads its settings where the registry says.

    Each variant's ``info["lineage"]`` becomes MLflow tags on its benchmark run: the chain, the run
    that made the model it was derived from (``parent_run``), every step's run and the teacher's run.
    With ``isolate``, a step that raises ends its chain (and the chains sharing that prefix) as a FAILED
    variant and the others go on (flows/isolation.py); without it (a tune trial, one chain) it raises.
    """
    products: dict[tuple[str, ...], ModelRef] = {}
    failures: dict[tuple[str, ...], tuple[str, Exception]] = {}
    variants = []
    for chain in cfg.compress.chains:
        steps, ref, parent = expand(chain), teacher, teacher
        failure = None
        for i, step in enumerate(steps):
            key = steps[: i + 1]
            if key not in products and key not in failures:
                try:
                    products[key] = RUNS[step](Step(stage, product_name(key), section(cfg, TECHNIQUES[step]), ref,
                                                    teacher, data, workdir))
                except Exception as exc:
                    if not isolate:
                        raise
                    failures[key] = (step, exc)
            if key in failures:
                failure = failures[key]
                break
            parent, ref = ref, products[key]
        if failure:
            variants += failed_variants([product_name(steps, "_")], *failure)
            continue
        lineage = {"chain": ">".join(chain), "parent_run": parent.run_id or "", "teacher_run": teacher.run_id or "",
                   "chain_runs": ",".join(f"{s}:{products[steps[: i + 1]].run_id}" for i, s in enumerate(steps))}
        variants.append(replace(ref, name=product_name(steps, "_"), info={**ref.info, "lineage": lineage}))
    return variants
