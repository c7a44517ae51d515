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

from dataclasses import dataclass, replace

from optforge.flows.chain_config import CompressConfig, expand, product_name
from optforge.tasks.compress import binarize_weights, circulant, cluster_weights, factorize, prune, qat
from optforge.tasks.distill import distill
from optforge.tasks.early_exit import early_exit
from optforge.tasks.export import export
from optforge.tasks.fuse import fuse_onnx
from optforge.tasks.quantize import quantize
from optforge.tasks.quantize_static import quantize_static
from optforge.tasks.refs import DataRef, ModelRef
from optforge.tasks.techniques.fusion import FuseConfig
from optforge.tasks.techniques.onnx_export import ExportConfig
from optforge.tasks.techniques.quantization import DynamicQuantConfig
from optforge.tasks.techniques.static_quant import StaticQuantConfig

__all__ = ["CompressConfig", "OnnxSteps", "chain_variants", "expand", "product_name"]


@dataclass(frozen=True)
class OnnxSteps:
    """The settings of a chain's ONNX steps, shared with the baseline's (the pipeline's top-level sections)."""

    export: ExportConfig
    fuse: FuseConfig
    quantize: DynamicQuantConfig
    static: StaticQuantConfig


# The in-process PyTorch steps, each with its config section of the same name (compress.<step>).
TORCH_TASKS = {"prune": prune, "factorize": factorize, "cluster": cluster_weights, "binarize": binarize_weights,
               "circulant": circulant, "early_exit": early_exit}


def _run_step(step: str, source: ModelRef, name: str, teacher: ModelRef, cfg: CompressConfig, data: DataRef,
              workdir: str, stage, onnx_cfgs: OnnxSteps) -> ModelRef:
    """One chain step through ``stage``; the task is renamed to its product so each gets its own stage tags."""
    if step == "distill":
        return stage(distill.with_options(name=name), cfg=cfg.distill, teacher=teacher, data=data, workdir=workdir,
                     run_name=name)
    if step == "qat":
        return stage(qat.with_options(name=name), cfg=cfg.qat, model=source, teacher=teacher, data=data,
                     workdir=workdir, run_name=name)
    if step in TORCH_TASKS:
        task, step_cfg = TORCH_TASKS[step], getattr(cfg, step)
        return stage(task.with_options(name=name), cfg=step_cfg, model=source, teacher=teacher, data=data,
                     workdir=workdir, run_name=name)
    if step == "export":
        out = stage(export.with_options(name=name), cfg=onnx_cfgs.export, model=source, data=data, workdir=workdir)
    elif step == "static":
        out = stage(quantize_static.with_options(name=name), cfg=onnx_cfgs.static, onnx_model=source, data=data,
                    workdir=workdir)
    elif step == "fuse":
        out = stage(fuse_onnx.with_options(name=name), cfg=onnx_cfgs.fuse, model=source, data=data, workdir=workdir,
                    run_name=name)
    else:
        out = stage(quantize.with_options(name=name), cfg=onnx_cfgs.quantize, onnx_model=source, workdir=workdir)
    # ONNX files carry no FLOP count of their own: keep the PyTorch source's counts with the ONNX facts.
    return replace(out, info={**source.info, **out.info})


def chain_variants(cfg: CompressConfig, teacher: ModelRef, data: DataRef, workdir: str, stage,
                   onnx_cfgs: OnnxSteps) -> list[ModelRef]:
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
                products[key] = _run_step(step, ref, product_name(key), teacher, cfg, data, workdir, stage, onnx_cfgs)
            parent, ref = ref, products[key]
        lineage = {"chain": ">".join(chain), "parent_run": parent.run_id or "", "teacher_run": teacher.run_id or "",
                   "chain_runs": ",".join(f"{s}:{products[steps[: i + 1]].run_id}" for i, s in enumerate(steps))}
        variants.append(replace(ref, name=product_name(steps, "_"), info={**ref.info, "lineage": lineage}))
    return variants
