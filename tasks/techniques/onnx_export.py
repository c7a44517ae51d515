"""ONNX export with a dynamic batch axis, validation, and parity against PyTorch.

Every exported model has one float32 input "input" of shape [batch, F] and one output "logits", so
quantizers, ONNX Runtime and TensorRT treat all variants alike.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch
from pydantic import Field
from torch import nn

from tasks.techniques.config import TechniqueConfig


class ExportConfig(TechniqueConfig):
    """ONNX export settings and the parity tolerance that guards them."""

    opset: int = Field(18, ge=13, description="ONNX opset version")
    parity_atol: float = Field(1e-4, gt=0, description="max abs difference allowed between PyTorch and ORT logits")
    parity_samples: int = Field(256, ge=1, description="held-out rows used for the parity check")


def load_onnx(path: str | Path) -> onnx.ModelProto:
    """Load and check an ONNX file; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX file not found: {path}")
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as exc:
        raise ValueError(f"{path} is not an ONNX model: {type(exc).__name__}: {exc}") from exc
    return model


def _drop_stale_value_info(model: onnx.ModelProto) -> None:
    """Remove ``value_info`` entries that shadow initializers.

    The dynamo exporter records each weight's shape in ``value_info`` as well. Initializers carry
    their own shapes, so these entries are redundant, and they go stale when a later pass rewrites a
    weight: ONNX Runtime's quantizer transposes Gemm weights (transB) under the same name and shape
    inference then fails with "Inferred shape and existing shape differ in dimension 0: (64) vs
    (256)". Dropping them fixes that at the source instead of switching to the deprecated exporter.
    """
    weights = {init.name for init in model.graph.initializer}
    keep = [vi for vi in model.graph.value_info if vi.name not in weights]
    del model.graph.value_info[:]
    model.graph.value_info.extend(keep)


def export_onnx(model: nn.Module, num_features: int, path: str | Path, cfg: ExportConfig) -> Path:
    """Export ``model`` (eval mode) to a single self-contained .onnx file; written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    example = torch.randn(2, num_features)
    batch = torch.export.Dim("batch", min=1)
    try:
        program = torch.onnx.export(
            model, (example,), dynamo=True, opset_version=cfg.opset, input_names=["input"],
            output_names=["logits"], dynamic_shapes=({0: batch},), optimize=True, verbose=False,
        )
    except Exception as exc:
        raise ValueError(f"ONNX export failed for {type(model).__name__}: {_first_line(exc)}") from exc
    proto = program.model_proto
    _drop_stale_value_info(proto)
    onnx.checker.check_model(proto, full_check=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".onnx")
    os.close(fd)
    try:
        onnx.save(proto, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _first_line(exc: Exception) -> str:
    """The exporter's messages run to pages; the first lines name the unsupported operator."""
    text = str(exc).strip().splitlines()
    return " ".join(text[:3])[:500] if text else type(exc).__name__


def max_abs_diff(model: nn.Module, onnx_path: str | Path, inputs: np.ndarray) -> float:
    """Largest absolute difference between PyTorch's and ONNX Runtime's logits on ``inputs``."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    x = np.ascontiguousarray(inputs, dtype=np.float32)
    ours = session.run(["logits"], {"input": x})[0]
    with torch.inference_mode():
        ref = model.eval()(torch.as_tensor(x)).numpy()
    return float(np.abs(ours - ref).max())


def check_parity(model: nn.Module, onnx_path: str | Path, inputs: np.ndarray, atol: float) -> float:
    """``max_abs_diff``, raising ``ValueError`` beyond ``atol``."""
    diff = max_abs_diff(model, onnx_path, inputs)
    if diff > atol:
        raise ValueError(f"ONNX parity check failed: max abs diff {diff:.3g} > parity_atol {atol}")
    return diff
