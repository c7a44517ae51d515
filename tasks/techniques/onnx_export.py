"""ONNX export with a dynamic batch axis, validation, and parity against PyTorch.

Every exported model has one float32 input "input" of shape [batch, F] and one output "logits", so
quantizers, ONNX Runtime and TensorRT treat all variants alike.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import torch
from pydantic import Field
from torch import nn

from tasks.techniques.config import TechniqueConfig
from tasks.techniques.files import atomic_write

# The dynamo exporter implements opset 18 natively; lower opsets go through ONNX's version converter.
_NATIVE_OPSET = 18


class ExportConfig(TechniqueConfig):
    """ONNX export settings and the parity tolerance that guards them."""

    opset: int = Field(18, ge=13, description="ONNX opset version (below 18 needs ONNX's version converter)")
    parity_atol: float = Field(1e-4, gt=0, description="max abs difference allowed between PyTorch and ORT logits")
    parity_samples: int = Field(256, ge=1, description="held-out rows used for the parity check")


def load_onnx(path: str | Path) -> onnx.ModelProto:
    """Load and check an ONNX file, so a wrong path fails here with its name, not deep inside a quantizer.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` exists but is not a valid ONNX model.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX file not found: {path}")
    try:
        # Checking by path (not proto) also works for models with external data or above 2 GB.
        onnx.checker.check_model(str(path))
        return onnx.load(str(path))
    except Exception as exc:
        raise ValueError(f"{path} is not an ONNX model: {type(exc).__name__}: {_summary(exc)}") from exc


def export_onnx(model: nn.Module, num_features: int, path: str | Path, cfg: ExportConfig) -> Path:
    """Export ``model`` in eval mode to one self-contained .onnx file with a dynamic batch axis.

    We use the dynamo exporter (torch's default; the TorchScript one is deprecated). It records each
    weight's shape in ``value_info`` as well as in the initializer. ORT's ``quantize_dynamic`` rewrites
    Gemm weights in place (transposes ``transB`` weights under the same name), so that copy goes stale
    and ONNX shape inference fails: "Inferred shape and existing shape differ in dimension 0: (64) vs
    (256)". We drop ``value_info`` entries that shadow initializers (initializers carry their own
    shapes), which fixes it at the source: the file quantizes with or without ORT's pre-processing.

    The file is written atomically (temp file + rename) so a crash never leaves a half-written model.

    Args:
        model: maps float32 (N, num_features) to logits (N, C). Its train/eval mode is restored after.
        num_features: F, the width of the input rows.
        path: destination .onnx file; parent folders are created.
        cfg: export settings.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        ValueError: export failed (names the operator when the exporter does), the exporter could not
            produce ``cfg.opset``, or the result fails ``onnx.checker``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Batch 2, not 1: torch.export specializes size-1 dimensions to constants.
    example = torch.randn(2, num_features)
    batch = torch.export.Dim("batch", min=1)
    name = type(model).__name__
    try:
        with _eval_mode(model):
            program = torch.onnx.export(
                model,
                (example,),
                dynamo=True,
                opset_version=cfg.opset,
                input_names=["input"],
                output_names=["logits"],
                dynamic_shapes=({0: batch},),
                optimize=True,
                verbose=False,
            )
    except Exception as exc:
        op = _operator_in(exc)
        where = f" at operator '{op}'" if op else ""
        raise ValueError(f"ONNX export of {name} failed{where}: {_summary(exc)}") from exc
    proto = program.model_proto
    got = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if got != cfg.opset:
        # The exporter silently keeps opset 18 when ONNX's version converter cannot go lower.
        raise ValueError(
            f"opset: requested {cfg.opset} but the exporter produced {got} for {name} (ONNX's version "
            f"converter could not lower it); opset >= {_NATIVE_OPSET} always works"
        )
    _drop_initializer_value_info(proto)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as exc:
        raise ValueError(f"exported ONNX model of {name} fails onnx.checker: {_summary(exc)}") from exc
    # onnx.save embeds the weights: a single file (protobuf allows up to 2 GB).
    return atomic_write(path, lambda tmp: onnx.save(proto, tmp))


def max_abs_diff(model: nn.Module, onnx_path: str | Path, inputs: np.ndarray) -> float:
    """Largest absolute difference between PyTorch's and ONNX Runtime's logits on ``inputs`` (N, F)."""
    import onnxruntime as ort

    load_onnx(onnx_path)  # errors name the file
    x = np.ascontiguousarray(inputs, dtype=np.float32)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"inputs: expected a non-empty (N, F) array, got shape {x.shape}")
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    ours = session.run(["logits"], {"input": x})[0]
    with _eval_mode(model), torch.inference_mode():
        ref = model(torch.from_numpy(x)).numpy()
    return float(np.abs(ours - ref).max())


def check_parity(model: nn.Module, onnx_path: str | Path, inputs: np.ndarray, atol: float) -> float:
    """``max_abs_diff``, raising ``ValueError`` beyond ``atol`` so a broken export never ships.

    Returns:
        The max abs difference (for logging).
    """
    diff = max_abs_diff(model, onnx_path, inputs)
    if not diff <= atol:  # also catches NaN
        raise ValueError(f"ONNX parity check failed: max abs diff {diff:.3g} > parity_atol {atol}")
    return diff


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode (dropout off, batch-norm frozen) for the duration; the caller's mode is restored."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _drop_initializer_value_info(model: onnx.ModelProto) -> None:
    """Remove ``value_info`` entries that shadow initializers (see ``export_onnx`` for why)."""
    weights = {init.name for init in model.graph.initializer}
    keep = [vi for vi in model.graph.value_info if vi.name not in weights]
    del model.graph.value_info[:]
    model.graph.value_info.extend(keep)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_OP_PATTERNS = (
    re.compile(r"OpOverload\(op='([\w.:]+)', overload='(\w+)'\)"),  # dynamo: "No ONNX function found for ..."
    re.compile(r"target=torch\.ops\.([\w.]+)"),  # dynamo: "Error when translating node ..."
    re.compile(r"operator '([\w.:]+)'"),  # TorchScript-style: "Exporting the operator 'aten::x' ..."
    re.compile(r"\b(aten[:.]{1,2}\w+)"),
)


def _operator_in(exc: BaseException) -> str | None:
    """The operator the exporter's error names, if any."""
    text = _ANSI.sub("", str(exc))
    for pattern in _OP_PATTERNS:
        match = pattern.search(text)
        if match:
            return ".".join(g for g in match.groups() if g)
    return None


def _summary(exc: BaseException, limit: int = 400) -> str:
    """A short message: the exporter's errors run to pages, the real cause sits under "Exception summary"."""
    text = _ANSI.sub("", str(exc))
    if "## Exception summary" in text:
        text = text.split("## Exception summary", 1)[1]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and ln.strip() != "⬆️"]
    return " ".join(lines[:2])[:limit] if lines else type(exc).__name__
