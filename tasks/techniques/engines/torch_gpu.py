"""PyTorch on the GPU: eager FP16/BF16 and ``torch.compile`` variants of the trained model.

These variants need no artifact of their own (they run the baseline's weights), so they are
described by a name, a dtype and a compile flag, and the benchmark builds the predictor. Without
CUDA they are not created, and the reason is recorded instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn

from optforge.tasks.techniques.config import TechniqueConfig
from optforge.tasks.techniques.contract import forward_logits
from optforge.tasks.techniques.measurement.metrics import Predictor

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class TorchGpuConfig(TechniqueConfig):
    """Which PyTorch GPU variants the benchmark measures when CUDA is present."""

    enabled: bool = Field(True, description="measure PyTorch GPU variants when CUDA is present")
    dtypes: tuple[Literal["fp16", "bf16"], ...] = Field(("fp16", "bf16"), description="eager half-precision variants")
    compile: bool = Field(True, description="add a torch.compile variant (in the first of dtypes, else fp32)")
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = Field(
        "default", description="torch.compile mode (reduce-overhead uses CUDA graphs: best at batch 1)"
    )


@dataclass(frozen=True)
class GpuVariant:
    """One PyTorch GPU variant: stable name, dtype, compiled or eager."""

    name: str
    dtype: str
    compiled: bool


def cuda_unavailable_reason() -> str | None:
    if not torch.cuda.is_available():
        return "CUDA is not available (torch.cuda.is_available() is False: no NVIDIA GPU or driver)"
    return None


def gpu_variants(cfg: TorchGpuConfig) -> list[GpuVariant]:
    """The variants ``cfg`` asks for, with stable names (pytorch_fp16_cuda, pytorch_fp16_compile_cuda...)."""
    variants = [GpuVariant(f"pytorch_{d}_cuda", d, False) for d in cfg.dtypes]
    if cfg.compile:
        dtype = cfg.dtypes[0] if cfg.dtypes else "fp32"
        variants.append(GpuVariant(f"pytorch_{dtype}_compile_cuda", dtype, True))
    return variants


def device_predictor(model: nn.Module, device: str, dtype: str, compiled: bool = False,
                     compile_mode: str = "default") -> Predictor:
    """Named inputs -> float32 logits, computed on ``device`` in ``dtype`` (integer inputs such as token ids
    keep their dtype).

    ``model`` is moved and cast in place (the benchmark loads a fresh copy per variant). Inputs are
    copied per call and outputs copied back, so the timing includes the transfers a real caller
    pays; ``.cpu()`` also waits for the GPU, so no explicit synchronize is needed.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {list(DTYPES)}, got {dtype!r}")
    torch_dtype = DTYPES[dtype]
    model = model.eval().to(device=device, dtype=torch_dtype)
    # dynamic=True: one graph for every batch size (accuracy chunks, batch 1, batch 64) instead of a recompile each.
    forward = torch.compile(model, mode=compile_mode, dynamic=True) if compiled else model

    def predict(batch) -> np.ndarray:
        with torch.inference_mode():
            inputs = {}
            for name, x in batch.items():
                t = torch.from_numpy(np.ascontiguousarray(x))
                inputs[name] = t.to(device=device, dtype=torch_dtype if t.is_floating_point() else t.dtype,
                                    non_blocking=True)
            return forward_logits(forward, inputs).float().cpu().numpy()

    return predict
