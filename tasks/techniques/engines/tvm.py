"""Apache TVM: compile an ONNX model into CPU libraries (one per static batch size), tuned with MetaSchedule.

TVM's Relax ONNX frontend imports the graph at fixed shapes (it fails on dynamic ones, e.g. the Reshape
of a dynamo-exported BERT), so each batch size in ``TvmConfig.batch_sizes`` gets its own library and the
runner splits a batch over them. Untuned, the CPU kernels are plain loop nests: on the default teacher
they ran 60-200x slower than ONNX Runtime. MetaSchedule's trials (measured schedules) close most of that
gap, at a cost of about a minute per 64 trials here, so the engine is off by default.

A workaround for apache-tvm 0.27 lives here (``_light_intrinsics``): its tensor-intrinsic package takes
15-40 s to import, and the tuner and every builder process import it. Another is in pyproject.toml:
apache-tvm-ffi 0.1.15 segfaults in the JSON serialization tuning relies on, so it is held below. The
``tvm`` package is optional (``pip install 'optforge[tvm]'``) and imported only inside functions.
"""

from __future__ import annotations

import json
import logging
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator

from optforge.tasks.techniques.config import TechniqueConfig
from optforge.tasks.techniques.onnx.export import _summary, load_onnx

MANIFEST = "tvm.json"  # in the variant's folder: input names and one library per batch size


class TvmConfig(TechniqueConfig):
    """Whether and how to compile the FP32 ONNX model with Apache TVM."""

    # Off by default: untuned kernels are far slower than ONNX Runtime and tuning takes minutes.
    enabled: bool = Field(False, description="compile with Apache TVM (variant tvm_llvm; skipped, with the reason, "
                          "where tvm is not installed or its ONNX frontend cannot take the graph)")
    trials: int = Field(64, ge=0, description="MetaSchedule tuning trials per batch size (0: untuned, seconds to "
                        "build but slow kernels; ~1 min per 64 trials on 2 cores)")
    target: str | dict[str, Any] = Field("native", description="'native' (llvm for this host's CPU) or a TVM target "
                                         "as a dict or JSON string, e.g. {\"kind\": \"llvm\", \"mcpu\": \"znver3\"}")
    search: Literal["evolutionary", "replay-trace"] = Field(
        "evolutionary", description="MetaSchedule search: evolutionary (mutates the best measured schedules) or "
        "replay-trace (random samples of the design space: cheaper per trial, for small budgets)")
    threads: int = Field(1, ge=1, description="CPU cores the kernels are tuned for (the target's num-cores)")
    batch_sizes: tuple[int, ...] = Field((1, 64), description="static batch sizes compiled, one library each (the "
                                         "benchmark times 1 and benchmark.batch_size)")
    parity_samples: int = Field(256, ge=1, description="held-out rows compared against ONNX Runtime")
    parity_atol: float = Field(1e-3, gt=0, description="max abs logit difference allowed against ONNX Runtime")

    @field_validator("batch_sizes")
    @classmethod
    def _sizes(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v or any(b < 1 for b in v):
            raise ValueError(f"batch_sizes: need one or more sizes >= 1, got {list(v)}")
        return tuple(sorted(set(v)))

    @field_validator("target")
    @classmethod
    def _target(cls, v: str | dict[str, Any]) -> str | dict[str, Any]:
        if v == "native":
            return v
        spec = v
        if isinstance(v, str):
            try:
                spec = json.loads(v)
            except json.JSONDecodeError:
                raise ValueError(f"target: 'native' or a JSON object such as {{\"kind\": \"llvm\"}}, got {v!r} "
                                 "(apache-tvm 0.27 refuses the old string form)") from None
        if not isinstance(spec, dict) or spec.get("kind") != "llvm":
            raise ValueError(f"target: only CPU targets (kind 'llvm') run here, got {v!r}")
        return v


@dataclass(frozen=True)
class TvmBuild:
    """What ``compile_onnx`` made: the manifest and the seconds spent."""

    folder: Path
    libraries: dict[int, str]  # batch size -> library file name in ``folder``
    target: dict[str, Any]
    compile_s: float
    tune_s: float
    tvm_version: str


class FrontendError(ValueError):
    """TVM's ONNX frontend cannot take this graph; the engine is skipped with this message."""


def unavailable_reason() -> str | None:
    """Why TVM cannot compile here, or None when it can. A spec lookup, not an import (importing tvm takes
    seconds), so the run's plan can ask before training."""
    import importlib.util

    if importlib.util.find_spec("tvm") is None:
        return "the apache-tvm package is not installed (pip install 'optforge[tvm]')"
    return None


def resolve_target(cfg: TvmConfig) -> dict[str, Any]:
    """The target as a dict: 'native' is llvm with this host's CPU name (LLVM's detection); num-cores from
    ``cfg.threads`` unless the dict sets it."""
    if cfg.target == "native":
        from tvm.target.codegen import llvm_get_system_cpu

        spec = {"kind": "llvm", "mcpu": llvm_get_system_cpu()}
    else:
        spec = json.loads(cfg.target) if isinstance(cfg.target, str) else dict(cfg.target)
    return {"num-cores": cfg.threads, **spec}


def _light_intrinsics(threads: int | None = None) -> None:
    """Import only this host's tensor intrinsics instead of ``tvm.s_tir.tensor_intrin``'s every backend.

    TVM's tuner and builder ``import tvm.s_tir.tensor_intrin``, whose ``__init__`` parses the CUDA, ROCm,
    Metal, ... intrinsics: 15-40 s on this machine, in the tuner and again in every builder process (the
    builder starts new processes per batch of trials, so 64 trials could not even build within its 30 s
    timeout). A llvm target can only use the x86 (or Arm) ones. Registering the package as an empty module
    with the real path makes Python load just that submodule. Also run in TVM's worker processes (as the
    pool initializer), where ``threads`` sets the runtime thread pool that measurements run with.
    """
    import importlib
    import importlib.util
    import sys
    import types

    name = "tvm.s_tir.tensor_intrin"
    if name not in sys.modules:
        spec = importlib.util.find_spec(name)
        package = types.ModuleType(name)
        package.__path__ = list(spec.submodule_search_locations)
        package.__spec__ = spec
        sys.modules[name] = package
        arm = platform.machine().lower() in ("arm64", "aarch64")
        importlib.import_module(f"{name}.{'arm_cpu' if arm else 'x86'}")
    if threads is not None:
        set_threads(threads)


def set_threads(threads: int) -> None:
    """Size TVM's CPU thread pool (process-wide, like ``torch.set_num_threads``)."""
    import tvm

    tvm.get_global_func("runtime.config_threadpool")(1, threads)  # 1: big cores first


def shapes(contract, batch: int) -> tuple[dict[str, list[int]], dict[str, str]]:
    """Static input shapes and dtypes at ``batch`` rows, from the input contract."""
    return ({t.name: list(t.concrete(batch, contract.sequence_length)) for t in contract.inputs},
            {t.name: t.dtype for t in contract.inputs})


def import_onnx(onnx_path: str | Path, contract, batch: int):
    """The ONNX model as a Relax module at ``batch`` rows; ``FrontendError`` when the frontend refuses it."""
    from tvm.relax.frontend.onnx import from_onnx

    proto = load_onnx(onnx_path)
    shape_dict, dtype_dict = shapes(contract, batch)
    try:
        return from_onnx(proto, shape_dict=shape_dict, dtype_dict=dtype_dict)
    except Exception as exc:
        raise FrontendError(f"TVM's Relax ONNX frontend cannot take {Path(onnx_path).name} at batch {batch}: "
                            f"{type(exc).__name__}: {_summary(exc, 300)}") from exc


def _prepare():
    """Legalize to TIR and fuse: what tuning and the build both see, so tuning records match at build time."""
    from tvm import relax, transform

    t = relax.transform
    return transform.Sequential([t.DecomposeOpsForInference(), t.LegalizeOps(), t.AnnotateTIROpPattern(),
                                 t.FoldConstant(), t.FuseOps(), t.FuseTIR()])


def _tune(mod, target, cfg: TvmConfig, work_dir: Path):
    """A MetaSchedule database of ``trials`` measured schedules over the module's fused kernels."""
    from functools import partial

    from tvm.s_tir import meta_schedule as ms

    console = logging.getLogger("tvm.s_tir.meta_schedule")
    if console.level == logging.NOTSET:
        # MetaSchedule sizes its console handler by this logger's level (its per-task tables fill a
        # pipeline's output otherwise); the full log still goes to work_dir/logs.
        console.setLevel(logging.WARNING)
    tasks = ms.relax_integration.extract_tasks(mod, target)
    # Per round, each kernel gets an equal share, so a small budget still reaches every kernel (the
    # default of 64 per round spends 64 trials on the first kernel alone).
    per_iter = max(1, min(64, cfg.trials // max(1, len(tasks))))
    init = partial(_light_intrinsics, cfg.threads)
    return ms.relax_integration.tune_relax(
        mod, {}, target, str(work_dir), max_trials_global=cfg.trials, num_trials_per_iter=per_iter,
        builder=ms.builder.LocalBuilder(max_workers=1, initializer=init),
        runner=ms.runner.LocalRunner(initializer=init),
        cost_model="random",  # "xgb", the default, needs xgboost; at tens of trials a model barely helps
        strategy=cfg.search, seed=0)


def _build(mod, target, database):
    """Relax VM executable: tuned kernels from ``database``, the rest as TVM's default schedules."""
    import tvm
    from tvm import relax
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    # cpu_generic's package omits dataflow_lower_passes in 0.27, so relax.pipeline's own dispatch fails.
    @tvm.transform.module_pass(opt_level=3)
    def pipeline(mod, _ctx):
        if database is not None:
            mod = relax.transform.MetaScheduleApplyDatabase()(mod)
        return tvm.transform.Sequential(cpu.dataflow_lower_passes(target) + cpu.finalize_passes(target))(mod)

    with target, tvm.transform.PassContext(opt_level=3):
        if database is None:
            return relax.build(mod, target=target, relax_pipeline=pipeline)
        with database:
            return relax.build(mod, target=target, relax_pipeline=pipeline)


def compile_onnx(onnx_path: str | Path, out_dir: str | Path, contract, cfg: TvmConfig) -> TvmBuild:
    """Compile ``onnx_path`` into ``out_dir``: one shared library per ``cfg.batch_sizes`` and ``MANIFEST``.

    Tuning records go to ``out_dir/tuning_b{batch}`` (MetaSchedule's JSON database and logs).

    Raises:
        FrontendError: the Relax ONNX frontend cannot import the graph.
    """
    import tvm

    _light_intrinsics()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec = resolve_target(cfg)
    target = tvm.target.Target(spec)
    libraries, compile_s, tune_s = {}, 0.0, 0.0
    for batch in cfg.batch_sizes:
        start = time.perf_counter()
        with target:
            mod = _prepare()(import_onnx(onnx_path, contract, batch))
        compile_s += time.perf_counter() - start
        database = None
        if cfg.trials:
            start = time.perf_counter()
            database = _tune(mod, target, cfg, out / f"tuning_b{batch}")
            tune_s += time.perf_counter() - start
        start = time.perf_counter()
        executable = _build(mod, target, database)
        name = f"model_b{batch}.so"
        with tempfile.TemporaryDirectory(dir=out) as tmp:  # atomic: a crash never leaves half a library
            executable.export_library(str(Path(tmp) / name))
            (Path(tmp) / name).replace(out / name)
        compile_s += time.perf_counter() - start
        libraries[batch] = name
    manifest = {"inputs": [t.name for t in contract.inputs], "dtypes": {t.name: t.dtype for t in contract.inputs},
                "sequence_length": contract.sequence_length,
                "libraries": {str(b): n for b, n in libraries.items()}, "target": spec, "trials": cfg.trials, "search": cfg.search,
                "tvm": tvm.__version__}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return TvmBuild(out, libraries, spec, round(compile_s, 3), round(tune_s, 3), tvm.__version__)


def library_mb(folder: str | Path) -> float:
    """MB (1e6 bytes) of the compiled libraries: what a deployment ships (the weights are inside them)."""
    manifest = json.loads((Path(folder) / MANIFEST).read_text())
    return round(sum((Path(folder) / n).stat().st_size for n in manifest["libraries"].values()) / 1e6, 4)


class TvmRunner:
    """Runs a compiled folder as a ``Predictor``: a batch is split over the static batch sizes, the last
    piece padded up to the smallest size that holds it."""

    def __init__(self, folder: str | Path, threads: int = 1):
        import tvm
        from tvm import relax

        folder = Path(folder)
        manifest = json.loads((folder / MANIFEST).read_text())
        self.inputs = manifest["inputs"]
        self.dtypes = manifest["dtypes"]
        set_threads(threads)
        self.vms = {int(b): relax.VirtualMachine(tvm.runtime.load_module(str(folder / n)), tvm.cpu())
                    for b, n in manifest["libraries"].items()}
        self.sizes = sorted(self.vms)
        self._tensor = tvm.runtime.tensor

    def __call__(self, batch) -> np.ndarray:
        n = len(batch[self.inputs[0]])
        outs, i = [], 0
        while i < n:  # greedy: the largest size that fits, else the smallest, padded
            size = max((b for b in self.sizes if b <= n - i), default=self.sizes[0])
            take = min(size, n - i)
            outs.append(self._run({k: np.asarray(batch[k])[i : i + take] for k in self.inputs}, size)[:take])
            i += take
        return np.concatenate(outs)

    def _run(self, rows: dict[str, np.ndarray], size: int) -> np.ndarray:
        args = []
        for name in self.inputs:
            x = np.ascontiguousarray(rows[name], dtype=self.dtypes[name])
            if len(x) < size:  # pad with copies of the last row; the extra logits are dropped
                x = np.concatenate([x, np.repeat(x[-1:], size - len(x), axis=0)])
            args.append(self._tensor(x))
        return self.vms[size]["main"](*args).numpy()
