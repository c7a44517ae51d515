"""Structured pruning of real architectures with torch-pruning (tasks/techniques/compression/graph_prune.py): tiny Hugging
Face BERT and ResNet configs lose heads, neurons and channels, still export to ONNX, ONNX Runtime agrees with
PyTorch, and a fresh model with the recorded history replayed takes the pruned weights."""

from __future__ import annotations

import copy
import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from optforge.tasks.techniques.compression.graph_prune import attention_modules, prune_channels, replay
from optforge.tasks.techniques.contract import forward_logits, image_contract, table_contract, text_contract
from optforge.tasks.techniques.models.models import MLP
from optforge.tasks.techniques.models.models import count_params as count
from optforge.tasks.techniques.onnx.export import ExportConfig, export_onnx
from tests.techniques.helpers import tiny_bert, tiny_resnet


def _ort_matches_torch(model, contract, path, feeds: dict[str, np.ndarray]) -> float:
    onnx_path = export_onnx(model, contract, path, ExportConfig())
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, feeds)
    with torch.inference_mode():
        ref = forward_logits(model, {k: torch.from_numpy(v) for k, v in feeds.items()}).numpy()
    return float(np.abs(logits - ref).max())


@torch.inference_mode()
def agree(a, b, contract, atol: float = 1e-5) -> bool:
    """Whether two models give the same logits on the contract's example inputs."""
    x = contract.example(batch=2)
    return torch.allclose(forward_logits(a.eval(), x), forward_logits(b.eval(), x), atol=atol)


def _replayed(original, contract, pruned, history):
    """A fresh copy of the original architecture, the history replayed, the pruned weights loaded (strict)."""
    rebuilt = replay(original, contract, json.loads(json.dumps(history)))  # the history survives JSON
    rebuilt.load_state_dict(pruned.state_dict())
    return rebuilt


def test_bert_loses_heads_and_feed_forward_neurons_but_keeps_its_hidden_size(tmp_path):
    bert, contract = tiny_bert(hidden=32), text_contract(12, 3, {})
    original, before = copy.deepcopy(bert), count(bert)
    bert, history = prune_channels(bert, contract, 0.5)
    assert [a.num_attention_heads for a, _ in attention_modules(bert)] == [2, 2]  # 4 heads -> 2, whole heads
    assert all(a.query.out_features == 2 * a.attention_head_size for a, _ in attention_modules(bert))
    assert bert.bert.encoder.layer[0].intermediate.dense.out_features == 32  # feed-forward 64 -> 32
    assert bert.bert.embeddings.word_embeddings.embedding_dim == 32  # the residual stream keeps its width
    assert bert.classifier.out_features == 3 and count(bert) < 0.7 * before
    ids = np.random.default_rng(0).integers(0, 60, (2, 9))  # another sequence length than traced
    assert _ort_matches_torch(bert, contract, tmp_path / "bert.onnx", {"input_ids": ids, "attention_mask": np.ones_like(ids)}) < 1e-4
    assert agree(bert, _replayed(original, contract, bert, history), contract)


def test_resnet_channels_shrink_across_residual_connections(tmp_path):
    resnet, contract = tiny_resnet(), image_contract(3, 32, 10, {})
    original, before = copy.deepcopy(resnet), count(resnet)
    resnet, history = prune_channels(resnet, contract, 0.5)
    convs = [m for m in resnet.modules() if isinstance(m, nn.Conv2d)]
    assert max(c.out_channels for c in convs) == 16  # the widest stage, 32 channels, halved
    assert resnet.classifier[-1].out_features == 10 and count(resnet) < 0.4 * before
    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32), dtype=np.float32)
    assert _ort_matches_torch(resnet, contract, tmp_path / "resnet.onnx", {"pixel_values": x}) < 1e-4
    assert agree(resnet, _replayed(original, contract, resnet, history), contract)


def test_zoo_mlp_keeps_its_head_and_replays():
    torch.manual_seed(0)
    mlp, contract = MLP(16, 4, (32, 24), dropout=0.0).eval(), table_contract(16, 4)
    original = copy.deepcopy(mlp)
    mlp, history = prune_channels(mlp, contract, 0.5)
    linears = [m for m in mlp.modules() if isinstance(m, nn.Linear)]
    assert [m.out_features for m in linears] == [16, 12, 4]
    assert agree(mlp, _replayed(original, contract, mlp, history), contract)


def test_a_history_for_another_architecture_does_not_load():
    bert, contract = tiny_bert(hidden=32), text_contract(12, 3, {})
    _, history = prune_channels(copy.deepcopy(bert), contract, 0.5)
    with pytest.raises(ValueError, match="pruning history names layers this architecture lacks"):
        replay(tiny_resnet(), image_contract(3, 32, 10, {}), history)


@pytest.mark.parametrize("name", ["distilbert", "deberta-v2", "mpnet", "modernbert", "vit"])
def test_each_familys_attention_loses_whole_heads_and_still_runs(name, tmp_path):
    """Each family keeps its projections and head count under its own names (DistilBERT's q_lin and n_heads,
    ViT's q_proj and head_dim, ...); a fused projection (ModernBERT's Wqkv) keeps its width."""
    from transformers import AutoModelForImageClassification, AutoModelForSequenceClassification

    from optforge.flows.architectures import TEXT_ARCHITECTURES, write_image_model, write_text_model
    from optforge.tasks.techniques.contract import forward_logits, image_contract, text_contract

    if name in TEXT_ARCHITECTURES:
        folder = write_text_model(name, tmp_path / name, ["alpha beta gamma", "delta epsilon"], 3)
        model, contract = AutoModelForSequenceClassification.from_pretrained(folder).eval(), text_contract(16, 3, {})
    else:
        folder = write_image_model(name, tmp_path / name, 10)
        model, contract = AutoModelForImageClassification.from_pretrained(folder).eval(), image_contract(3, 32, 10, {})
    before = [(getattr(a, lay.heads), getattr(a, lay.head_size)) for a, lay in attention_modules(model)]
    prune_channels(model, contract, 0.3)  # 30% of 32 channels is no whole number of 16-wide heads
    after = [(getattr(a, lay.heads), getattr(a, lay.head_size)) for a, lay in attention_modules(model)]
    assert forward_logits(model, contract.example(batch=2)).shape == (2, contract.num_classes)
    assert [size for _, size in after] == [size for _, size in before]  # head size never pruned
    assert all(getattr(a, lay.projections[0]).out_features == h * s for (a, lay), (h, s) in
               zip(attention_modules(model), after))
