"""TensorRT engines from ONNX: strongly typed FP16 and explicitly quantized INT8, a runner, parity.

Precision comes from the ONNX model, not from builder flags: TensorRT 10.1 deprecated implicit INT8
calibrators and TensorRT 11 removed the weak-typing flags (``BuilderFlag.FP16``/``INT8``) altogether.
So the FP16 engine is built from the FP16 ONNX model and the INT8 engine from a QDQ model with
symmetric signed INT8 scales (the only kind TensorRT accepts), as a strongly typed network. The
``tensorrt`` package is optional (``pip install 'optforge[tensorrt]'``) and imported only here.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from optforge.tasks.techniques.config import TechniqueConfig
from optforge.tasks.techniques.files import atomic_write
from optforge.tasks.techniques.onnx.export import load_onnx


class TensorRTConfig(TechniqueConfig):
    """Which engines to build and how."""

    enabled: bool = Field(True, description="build TensorRT engines (skipped, with the reason recorded, without CUDA or tensorrt)")
    precisions: tuple[Literal["fp16", "int8"], ...] = Field(("fp16", "int8"), description="engines to build: trt_fp16, trt_int8")
    min_batch: int = Field(1, ge=1, description="smallest batch of the optimization profile")
    opt_batch: int = Field(64, ge=1, description="batch the kernels are tuned for")
    max_batch: int = Field(256, ge=1, description="largest batch of the optimization profile")
    workspace_mb: int = Field(1024, ge=16, description="builder scratch memory limit, MiB")
    optimization_level: int = Field(3, ge=0, le=5, description="builder optimization level (higher: longer build, maybe faster engine)")
    timing_cache: bool = Field(True, description="reuse layer timings across builds (a file in the work folder)")
    parity_samples: int = Field(256, ge=1, description="held-out rows compared against ONNX Runtime")
    min_top1_agreement: float = Field(0.99, gt=0, le=1, description="least share of rows whose top-1 class matches ONNX Runtime's")

    @model_validator(mode="after")
    def _profile_ordered(self):
        if not self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError(f"min_batch <= opt_batch <= max_batch required, got {self.min_batch}, {self.opt_batch}, {self.max_batch}")
        return self


def unavailable_reason() -> str | None:
    """Why engines cannot be built here (both reasons when both apply), or None when they can."""
    import importlib.util

    import torch

    reasons = []
    if not torch.cuda.is_available():
        reasons.append("CUDA is not available (torch.cuda.is_available() is False: no NVIDIA GPU or driver)")
    if importlib.util.find_spec("tensorrt") is None:
        reasons.append("the tensorrt package is not installed (pip install 'optforge[tensorrt]')")
    return "; ".join(reasons) or None


def environment() -> str:
    """What an engine depends on (GPU, TensorRT version); part of the cache key, so a skip cached on a
    CPU machine or an engine built for another GPU is never reused."""
    reason = unavailable_reason()
    if reason:
        return f"unavailable: {reason}"
    import tensorrt as trt
    import torch

    cc = ".".join(map(str, torch.cuda.get_device_capability()))
    return f"tensorrt={trt.__version__} gpu={torch.cuda.get_device_name()} cc={cc} host={platform.machine()}"


def _logger():
    import tensorrt as trt

    return trt.Logger(trt.Logger.WARNING)


def profile_shapes(contract, cfg: TensorRTConfig) -> dict[str, tuple[tuple[int, ...], ...]]:
    """(min, opt, max) shape per input: batch from ``cfg``; a sequence axis spans 2 .. the data's length,
    tuned at the data's length (what the data was tokenized to)."""
    seq = contract.sequence_length
    return {t.name: (t.concrete(cfg.min_batch, 2 if seq else None), t.concrete(cfg.opt_batch, seq),
                     t.concrete(cfg.max_batch, seq)) for t in contract.inputs}


def build_engine(onnx_path: str | Path, engine_path: str | Path, cfg: TensorRTConfig, contract,
                 timing_cache_path: str | Path | None = None) -> dict:
    """Build a serialized engine from a typed ONNX model (FP16, or INT8 QDQ); return the build settings.

    One optimization profile per input (``profile_shapes``) spans ``min_batch..max_batch`` on the batch
    axis, tuned at ``opt_batch``, and a text input's sequence axis up to the data's length.
    The timing cache is read before and written after the build, so later builds skip layer timing.
    """
    import tensorrt as trt

    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    load_onnx(onnx_path)  # clear error naming the file when missing or not ONNX
    shapes = profile_shapes(contract, cfg)
    logger = _logger()
    builder = trt.Builder(logger)
    major = int(trt.__version__.split(".")[0])
    strongly = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    # Required for typed precision on 10.x; always on (and the flag deprecated) from 11.
    flags = 1 << int(strongly) if strongly is not None and major < 11 else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ValueError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, cfg.workspace_mb << 20)
    config.builder_optimization_level = cfg.optimization_level
    profile = builder.create_optimization_profile()
    for name, (low, opt, high) in shapes.items():
        profile.set_shape(name, low, opt, high)
    config.add_optimization_profile(profile)
    cache = None
    if timing_cache_path is not None:
        timing_cache_path = Path(timing_cache_path)
        blob = timing_cache_path.read_bytes() if timing_cache_path.exists() else b""
        cache = config.create_timing_cache(blob)
        config.set_timing_cache(cache, ignore_mismatch=False)
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see the TensorRT log above)")
    atomic_write(engine_path, lambda tmp: Path(tmp).write_bytes(bytes(serialized)))
    if cache is not None:
        atomic_write(timing_cache_path, lambda tmp: Path(tmp).write_bytes(bytes(config.get_timing_cache().serialize())))
    return {
        "tensorrt_version": trt.__version__, "strongly_typed": True, "source_onnx": onnx_path.name,
        "inputs": list(shapes), "profile_min_opt_max": {n: [list(x) for x in v] for n, v in shapes.items()},
        "workspace_mb": cfg.workspace_mb, "optimization_level": cfg.optimization_level,
        "timing_cache": str(timing_cache_path) if cache is not None else None, "build_seconds": round(seconds, 2),
    }


class EngineRunner:
    """Runs a serialized engine on CUDA with torch tensors as buffers (no pycuda or cuda-python needed)."""

    def __init__(self, engine_path: str | Path):
        import tensorrt as trt
        import torch

        path = Path(engine_path)
        if not path.is_file():
            raise FileNotFoundError(f"TensorRT engine not found: {path}")
        self.engine = trt.Runtime(_logger()).deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise ValueError(f"{path} is not a TensorRT engine for this GPU and TensorRT version")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.inputs = [n for n in names if is_input[n]]
        self.output = next(n for n in names if not is_input[n])
        dtypes = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32, trt.int64: torch.int64}
        self.dtypes = {n: dtypes[self.engine.get_tensor_dtype(n)] for n in self.inputs}
        self.out_dtype = dtypes[self.engine.get_tensor_dtype(self.output)]
        self.max_batch = int(self.engine.get_tensor_profile_shape(self.inputs[0], 0)[2][0])
        self.stream = torch.cuda.Stream()

    def __call__(self, batch) -> np.ndarray:
        """Logits for a batch of named inputs; batches above the profile's maximum run in slices."""
        n = len(next(iter(batch.values())))
        return np.concatenate([self._run({k: v[i : i + self.max_batch] for k, v in batch.items()})
                               for i in range(0, n, self.max_batch)])

    def _run(self, batch) -> np.ndarray:
        import torch

        with torch.cuda.stream(self.stream):
            keep = []
            for name in self.inputs:
                t = torch.from_numpy(np.ascontiguousarray(batch[name])).to("cuda", self.dtypes[name], non_blocking=True)
                keep.append(t)
                self.context.set_input_shape(name, tuple(t.shape))
                self.context.set_tensor_address(name, t.data_ptr())
            out = torch.empty(tuple(self.context.get_tensor_shape(self.output)), dtype=self.out_dtype, device="cuda")
            self.context.set_tensor_address(self.output, out.data_ptr())
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError("TensorRT execution failed")
            result = out.float().cpu()  # .cpu() waits for the stream
        return result.numpy()


def parity(runner, onnx_path: str | Path, part) -> dict[str, float]:
    """Engine vs ONNX Runtime on the same ONNX model over ``part``: max abs logit difference, top-1 agreement."""
    from optforge.tasks.techniques.measurement.metrics import predict_part
    from optforge.tasks.techniques.onnx.static import logits

    ours = predict_part(runner, part)
    ref = logits(Path(onnx_path), part)
    return {"max_abs_diff": float(np.abs(ours - ref).max()), "top1_agreement": float((ours.argmax(1) == ref.argmax(1)).mean())}
