"""FP16 ONNX: weights and activations in half precision, for GPUs (ONNX Runtime CUDA, TensorRT).

On a CPU, ONNX Runtime has few FP16 kernels and inserts casts back to FP32, so the variant is
measured there for accuracy and size, not speed. TensorRT 11 builds only strongly typed networks, so
this model (not a builder flag) is what an FP16 engine is built from.
"""

from __future__ import annotations

from pathlib import Path

import onnx
from pydantic import Field

from optforge.tasks.techniques.config import TechniqueConfig
from optforge.tasks.techniques.files import atomic_write
from optforge.tasks.techniques.onnx.export import load_onnx


class Fp16Config(TechniqueConfig):
    """ONNX Runtime ``convert_float_to_float16`` settings."""

    enabled: bool = Field(True, description="build the onnx_fp16 variant")
    keep_io_types: bool = Field(True, description="keep graph inputs/outputs FP32 (casts at the edges) so callers feed the same arrays")
    op_block_list: tuple[str, ...] = Field((), description="op types kept in FP32, besides ONNX Runtime's default list")


def topological_sort(graph: onnx.GraphProto) -> None:
    """Reorder ``graph.node`` so each node follows the producers of its inputs (in place).

    ``convert_float_to_float16`` appends the input/output Cast nodes at the end of the node list.
    ONNX Runtime tolerates that, but the ONNX checker (and stricter consumers) require topological
    order. Kahn's algorithm, stable: among ready nodes, the original order is kept.
    """
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:
            missing = sorted({i for n in pending for i in n.input} - available)
            raise ValueError(f"graph has a cycle or dangling inputs: {missing[:5]}")
        for n in ready:
            available.update(n.output)
        ordered += ready
        ready_ids = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in ready_ids]
    nodes = [onnx.NodeProto.FromString(n.SerializeToString()) for n in ordered]
    del graph.node[:]
    graph.node.extend(nodes)


def convert_fp16(src: str | Path, dst: str | Path, cfg: Fp16Config) -> Path:
    """Convert ``src`` to FP16 at ``dst`` (checked, written atomically)."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    src, dst = Path(src), Path(dst)
    model = load_onnx(src)  # clear error naming the file when it is missing or not ONNX
    converted = convert_float_to_float16(
        model, keep_io_types=cfg.keep_io_types, op_block_list=[*DEFAULT_OP_BLOCK_LIST, *cfg.op_block_list]
    )
    topological_sort(converted.graph)
    onnx.checker.check_model(converted, full_check=True)
    return atomic_write(dst, lambda tmp: onnx.save(converted, tmp))


def fp16_initializer_share(path: str | Path) -> float:
    """Share of initializer elements stored as FP16 (1.0: every weight converted)."""
    import numpy as np

    inits = load_onnx(path).graph.initializer
    sizes = [(int(np.prod(i.dims, dtype=np.int64)), i.data_type == onnx.TensorProto.FLOAT16) for i in inits]
    total = sum(n for n, _ in sizes)
    return sum(n for n, half in sizes if half) / total if total else 0.0
