"""ONNX export from the input contract, validation, and parity against PyTorch on real batches.

Every exported model takes the contract's inputs under their names (``input`` for tables,
``pixel_values`` for images, ``input_ids`` + ``attention_mask`` for text) with dynamic batch (and
sequence) axes, and has one output ``logits``, so quantizers, ONNX Runtime and TensorRT treat all
variants alike.
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

from optforge.tasks.techniques.config import TechniqueConfig
from optforge.tasks.techniques.contract import BATCH, InputContract, LogitsModule, as_tensors
from optforge.tasks.techniques.files import atomic_write

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


def export_onnx(model: nn.Module, contract: InputContract, path: str | Path, cfg: ExportConfig,
                example: dict[str, np.ndarray] | None = None) -> Path:
    """Export ``model`` in eval mode to one self-contained .onnx file taking the contract's inputs.

    We use the dynamo exporter (torch's default; the TorchScript one is deprecated). It records each
    weight's shape in ``value_info`` as well as in the initializer. ORT's ``quantize_dynamic`` rewrites
    Gemm weights in place (transposes ``transB`` weights under the same name), so that copy goes stale
    and ONNX shape inference fails: "Inferred shape and existing shape differ in dimension 0: (64) vs
    (256)". We drop ``value_info`` entries that shadow initializers (initializers carry their own
    shapes), which fixes it at the source: the file quantizes with or without ORT's pre-processing.

    The file is written atomically (temp file + rename) so a crash never leaves a half-written model.

    Args:
        model: takes the contract's inputs (by name or, for one input, by position) and returns logits
            (a tensor or a Hugging Face output). Its train/eval mode is restored after.
        contract: the inputs: names, dtypes, which axes are dynamic.
        path: destination .onnx file; parent folders are created.
        cfg: export settings.
        example: real rows to trace with (two or more; default: the contract's example tensors).

    Returns:
        ``path`` as a ``Path``.

    Raises:
        ValueError: export failed (names the operator when the exporter does), the exporter could not
            produce ``cfg.opset``, or the result fails ``onnx.checker``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    name = type(model).__name__
    try:
        proto = export_program(model, contract, example, cfg.opset).model_proto
    except ValueError as dynamo_error:
        proto = _torchscript_fallback(model, contract, path, cfg.opset, dynamo_error)
    got = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if got != cfg.opset:
        # The exporter silently keeps opset 18 when ONNX's version converter cannot go lower.
        raise ValueError(
            f"opset: requested {cfg.opset} but the exporter produced {got} for {name} (ONNX's version "
            f"converter could not lower it); opset >= {_NATIVE_OPSET} always works"
        )
    _drop_initializer_value_info(proto)
    _drop_stack_traces(proto.graph)
    if _shares_parameters(model):
        proto = _dedupe_initializers(proto)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as exc:
        raise ValueError(f"exported ONNX model of {name} fails onnx.checker: {_summary(exc)}") from exc
    # onnx.save embeds the weights: a single file (protobuf allows up to 2 GB).
    return atomic_write(path, lambda tmp: onnx.save(proto, tmp))


def _torchscript_fallback(model: nn.Module, contract: InputContract, path: Path, opset: int,
                          dynamo_error: ValueError) -> onnx.ModelProto:
    """The TorchScript exporter's graph when the dynamo exporter cannot take the model with a symbolic batch
    (Swin's window partition views a non-contiguous tensor of batch ``4*s``); the parity check that follows
    every export still decides whether it computes what the model computes. Raises the dynamo error, with
    the fallback's, when both fail."""
    import logging

    scratch = path.with_name(f".{path.stem}.torchscript.onnx")
    try:
        export_torchscript(model, contract, scratch, opset)
        proto = onnx.load(str(scratch))
    except Exception as exc:
        raise ValueError(f"{dynamo_error}; the TorchScript exporter failed too: {_summary(exc)}") from dynamo_error
    finally:
        scratch.unlink(missing_ok=True)
    logging.getLogger(__name__).warning("%s; exported with the TorchScript exporter instead", dynamo_error)
    return proto


def trace_inputs(contract: InputContract, example: dict[str, np.ndarray] | None) -> tuple[torch.Tensor, ...]:
    """Tensors to trace with, in contract order. Batch 2, not 1: torch.export specializes size-1
    dimensions to constants."""
    if example is None:
        tensors = contract.example(batch=2)
    else:
        rows = {k: np.asarray(v)[:2] for k, v in example.items()}
        if any(len(v) < 2 for v in rows.values()):
            rows = {k: np.concatenate([v, v])[:2] for k, v in rows.items()}
        tensors = as_tensors(rows)
    return tuple(tensors[n] for n in contract.names)


def dynamic_shapes(contract: InputContract) -> tuple[dict[int, object], ...]:
    """``torch.export`` dims per input, one ``Dim`` per symbolic name (shared across inputs: ``input_ids``
    and ``attention_mask`` have the same sequence length)."""
    dims = {}
    out = []
    for t in contract.inputs:
        axes = {}
        for i, d in enumerate(t.shape):
            if isinstance(d, str):
                dims.setdefault(d, torch.export.Dim(d, min=1 if d == BATCH else 2))
                axes[i] = dims[d]
        out.append(axes)
    return tuple(out)


def export_program(model: nn.Module, contract: InputContract, example: dict[str, np.ndarray] | None, opset: int):
    """The dynamo exporter's ONNXProgram for ``model`` wrapped to take the contract's inputs in order."""
    wrapped = LogitsModule(model, contract.names)
    wrapped.training = False  # the wrapper's own flag only: _eval_mode restores the caller's model afterwards
    name = type(model).__name__
    try:
        with _eval_mode(model):
            return torch.onnx.export(
                wrapped,
                trace_inputs(contract, example),
                dynamo=True,
                opset_version=opset,
                input_names=list(contract.names),
                output_names=["logits"],
                dynamic_shapes=(dynamic_shapes(contract),),  # one entry: LogitsModule's *tensors
                optimize=True,
                verbose=False,
            )
    except Exception as exc:
        op = _operator_in(exc)
        where = f" at operator '{op}'" if op else ""
        raise ValueError(f"ONNX export of {name} failed{where}: {_summary(exc)}") from exc


def save_program(model: nn.Module, contract: InputContract, example: dict[str, np.ndarray] | None,
                 path: str | Path) -> Path:
    """``torch.export`` the model (contract inputs in order, logits out, dynamic axes as in ONNX export) and
    save the program: it loads with ``torch.export.load`` alone, without optforge or the model's code."""
    wrapped = LogitsModule(model, contract.names)
    wrapped.training = False
    with _eval_mode(model):
        program = torch.export.export(wrapped, trace_inputs(contract, example),
                                      dynamic_shapes=(dynamic_shapes(contract),))
    return atomic_write(path, lambda tmp: torch.export.save(program, tmp), suffix=".pt2")


def max_abs_diff(model: nn.Module, onnx_path: str | Path, batch: dict[str, np.ndarray]) -> float:
    """Largest absolute difference between PyTorch's and ONNX Runtime's logits on one batch of named inputs."""
    from optforge.tasks.techniques.contract import forward_logits
    from optforge.tasks.techniques.onnx.ort_session import session_predictor, tuned_session

    load_onnx(onnx_path)  # errors name the file
    if not batch or len(next(iter(batch.values()))) == 0:
        raise ValueError("inputs: expected a non-empty batch of named inputs")
    ours = session_predictor(tuned_session(onnx_path, threads=1))(batch)
    with _eval_mode(model), torch.inference_mode():
        ref = forward_logits(model, as_tensors(batch)).float().numpy()
    return float(np.abs(ours - ref).max())


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode (dropout off, batch-norm frozen) for the duration; the caller's mode is restored."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _shares_parameters(model: nn.Module) -> bool:
    return len(list(model.named_parameters(remove_duplicate=False))) > len(list(model.parameters()))


def _dedupe_initializers(proto: onnx.ModelProto) -> onnx.ModelProto:
    """One copy of each set of equal initializers. A module used in several places (a transformer's shared
    layers) is stored once by the exporter, but its constant folding transposes a weight once per use; ORT's
    ``remove_duplicated_initializer`` (written for ALBERT's shared weights) points all uses at one copy."""
    import io

    from onnxruntime.transformers.onnx_model import OnnxModel

    model = OnnxModel(proto)
    with contextlib.redirect_stdout(io.StringIO()):  # it prints "Removed N initializers ..."
        model.remove_duplicated_initializer(cache={})
    return model.model


def _drop_initializer_value_info(model: onnx.ModelProto) -> None:
    """Remove ``value_info`` entries that shadow initializers (see ``export_onnx`` for why)."""
    weights = {init.name for init in model.graph.initializer}
    keep = [vi for vi in model.graph.value_info if vi.name not in weights]
    del model.graph.value_info[:]
    model.graph.value_info.extend(keep)


STACK_TRACE = "pkg.torch.onnx.stack_trace"  # the dynamo exporter's per-node Python stack: debugging only


def _drop_stack_traces(graph: onnx.GraphProto) -> None:
    """Remove the exporter's per-node stack traces, in control-flow branches too. They are debugging
    notes, not the model, yet they weighed 0.8 MB of a 5.8 MB BERT file and 17.4 MB of its early-exit
    export, where every nested ``If`` branch repeats the stack of the ``torch.cond`` calls above it."""
    for node in graph.node:
        keep = [p for p in node.metadata_props if p.key != STACK_TRACE]
        if len(keep) != len(node.metadata_props):
            del node.metadata_props[:]
            node.metadata_props.extend(keep)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                _drop_stack_traces(attr.g)


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


def export_torchscript(model: nn.Module, contract: InputContract, path: str | Path, opset: int) -> Path:
    """The contract's inputs and one ``logits`` output, dynamic axes as in ``export_onnx``, but through torch's
    TorchScript exporter, written atomically. For the graphs the dynamo exporter cannot give here: ORT's
    transformer fusion patterns (fuse.py), fake-quantize operators with a dynamic batch (qat.py), and models it
    cannot export with a symbolic batch (``export_onnx`` falls back to it)."""
    import warnings

    wrapped = LogitsModule(model.eval(), contract.names)
    example = tuple(contract.example(batch=2).values())
    axes = contract.dynamic_axes() | {"logits": {0: BATCH}}
    with warnings.catch_warnings(), torch.inference_mode(False):
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracer warnings: nothing to act on
        atomic_write(Path(path), lambda tmp: torch.onnx.export(
            wrapped, example, str(tmp), dynamo=False, opset_version=opset, input_names=list(contract.names),
            output_names=["logits"], dynamic_axes=axes))
    return Path(path)
