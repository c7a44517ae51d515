"""Transformer graph fusion with ONNX Runtime's transformer optimizer.

``onnxruntime.transformers.optimizer.optimize_model`` pattern-matches a transformer's subgraphs and
replaces them by ONNX Runtime's fused contrib operators: one ``Attention`` node per self-attention
block (the Q/K/V MatMuls, the scaled softmax and the head reshapes), ``SkipLayerNormalization``
(residual add + LayerNorm), ``BiasGelu`` and ``EmbedLayerNormalization``. Fewer, larger kernels cut
the per-node overhead that dominates a transformer at batch 1, and dynamic INT8 then quantizes the
fused ``Attention`` as ``QAttention``.

Its patterns were written against the TorchScript exporter's graphs with eager ("math") attention.
Measured here (torch 2.13, ORT 1.32, tiny and BERT-base configs): the dynamo exporter's graph fuses
LayerNorm and GELU but no ``Attention`` node, with SDPA or eager attention alike; the TorchScript
exporter with eager attention fuses every block. So this stage exports its own graph that way, from
the PyTorch model, rather than rewriting the pipeline's ``onnx_fp32``; the TorchScript exporter is
deprecated in torch, and when it goes this stage is skipped with the exporter's error.

Model types: ORT's optimizer knows a family per ``model_type`` (``bert`` covers BERT, RoBERTa,
DistilBERT, ELECTRA and XLM-R; ``vit`` covers ViT and DeiT). Other models are skipped with the reason.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import onnx
from pydantic import Field
from torch import nn

from optforge.tasks.techniques.compression.graph_prune import attention_modules
from optforge.tasks.techniques.config import TechniqueConfig
from optforge.tasks.techniques.contract import InputContract
from optforge.tasks.techniques.files import atomic_write
from optforge.tasks.techniques.onnx.export import export_torchscript

# Hugging Face model_type -> ORT optimizer family (onnxruntime.transformers.optimizer.MODEL_TYPES).
ORT_FAMILY = {"bert": "bert", "roberta": "bert", "distilbert": "bert", "electra": "bert", "xlm-roberta": "bert",
              "camembert": "bert", "vit": "vit", "deit": "vit"}
COUNTED = ("Attention", "MultiHeadAttention", "EmbedLayerNormalization", "SkipLayerNormalization",
           "LayerNormalization", "BiasGelu", "Gelu", "FastGelu")


class FuseConfig(TechniqueConfig):
    """ONNX Runtime transformer fusion: the ``onnx_fused`` variant and its dynamic INT8."""

    enabled: bool = Field(True, description="build onnx_fused (and onnx_fused_int8_dynamic) for supported transformers")
    opset: int = Field(18, ge=14, le=20, description="opset of the TorchScript export the optimizer reads")
    parity_atol: float = Field(1e-3, gt=0, description="max abs logit difference between PyTorch and the fused graph")


def ort_family(hf_config: dict | None) -> str | None:
    """The ORT optimizer family of a Hugging Face config, or None when it has none (or there is no config)."""
    return ORT_FAMILY.get((hf_config or {}).get("model_type", ""))


def unsupported_reason(hf_config: dict | None) -> str | None:
    """Why fusion cannot apply to a model with this Hugging Face config (None: it applies)."""
    if hf_config is None:
        return "fuse: ONNX Runtime's transformer optimizer fuses Hugging Face transformers; this model is not one"
    if ort_family(hf_config) is None:
        return (f"fuse: model_type '{hf_config.get('model_type')}' has no ONNX Runtime optimizer family "
                f"(supported: {sorted(ORT_FAMILY)})")
    return None


@contextlib.contextmanager
def _eager_attention(model: nn.Module):
    """Switch a Hugging Face model to eager attention for the export, and back."""
    before = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if before and hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")
    try:
        yield
    finally:
        if before and hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation(before)


def export_for_fusion(model: nn.Module, contract: InputContract, path: str | Path, opset: int) -> Path:
    """TorchScript export with eager attention (module docstring): the graph ORT's fusion patterns match."""
    with _eager_attention(model):
        return export_torchscript(model, contract, path, opset)


def attention_shape(model: nn.Module) -> tuple[int, int]:
    """(heads, hidden size) of the first self-attention block: what the optimizer's Attention fusion needs (it
    cannot read them from this exporter's graph). Hidden size is the block's input width, which head pruning
    keeps."""
    blocks = attention_modules(model)
    if not blocks:
        return 0, 0
    attn, layout = blocks[0]
    return int(getattr(attn, layout.heads)), int(getattr(attn, layout.projections[0]).in_features)


def fuse(src: str | Path, dst: str | Path, hf_config: dict, num_heads: int, hidden_size: int) -> dict[str, int]:
    """Run ORT's transformer optimizer on ``src``; write ``dst``; return the fused operator counts and the
    node counts before and after. A block whose shape differs from ``num_heads``/``hidden_size`` (layers
    pruned unevenly) is left unfused or fused wrongly: the caller's parity check decides."""
    from onnxruntime.transformers.optimizer import optimize_model

    family = ort_family(hf_config)
    if family is None:
        raise ValueError(unsupported_reason(hf_config))
    before = len(onnx.load(str(src)).graph.node)
    optimized = optimize_model(str(src), model_type=family, num_heads=num_heads, hidden_size=hidden_size)
    stats = {k: int(v) for k, v in optimized.get_fused_operator_statistics().items() if k in COUNTED}
    atomic_write(Path(dst), lambda tmp: optimized.save_model_to_file(str(tmp)))
    return {**stats, "nodes_before": before, "nodes_after": len(optimized.model.graph.node)}
