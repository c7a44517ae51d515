"""Early exit (tasks/techniques/compression/early_exit.py, exit_policy.py): a confident sample leaves at an early head, a
sample's answer does not depend on its batch, the exported ONNX model (If nodes) routes as PyTorch does,
the curve and the chosen threshold follow the validation split, and bad settings are named."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from optforge.tasks.techniques.compression.early_exit import (
    NEVER,
    EarlyExitConfig,
    EarlyExitModel,
    blocks_of,
    first_confident,
)
from optforge.tasks.techniques.compression.exit_policy import (
    choose_threshold,
    curve,
    exit_latencies_ms,
    exit_probs,
    train_heads,
)
from optforge.tasks.techniques.contract import table_contract
from optforge.tasks.techniques.models.models import DSCNN, MLP, SmallCNN
from optforge.tasks.techniques.onnx.export import ExportConfig, export_onnx
from optforge.tasks.techniques.onnx.ort_session import tuned_session
from tests.techniques.helpers import rows, table_part


def _blobs(n: int, seed: int, spread: float = 1.0):
    """Three Gaussian classes in 16 dimensions: most rows far from the others (easy), some between (hard)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((3, 16)) * 3
    y = rng.integers(0, 3, n)
    scale = np.where(rng.random(n) < 0.7, 0.3, 2.5)[:, None] * spread
    return (centres[y] + rng.standard_normal((n, 16)) * scale).astype(np.float32), y


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    X, y = _blobs(600, 0)
    model = MLP(16, 3, (32, 32, 32), dropout=0.0)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(model(torch.as_tensor(X)), torch.as_tensor(y)).backward()
        opt.step()
    ee = EarlyExitModel(model.eval(), None, 3, {"input": torch.as_tensor(X[:1])})
    before = [p.detach().clone() for p in model.parameters()]
    train_heads(ee, table_part(X, y), EarlyExitConfig())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # the backbone was frozen
    return ee, X, y


def test_blocks_of_zoo_models_and_a_clear_error_for_others():
    assert len(blocks_of(MLP(8, 3, (16, 16, 16))).blocks) == 3
    cnn = blocks_of(SmallCNN((1, 8, 8), 3, (4, 8)))
    assert len(cnn.blocks) == 2 and isinstance(cnn.head(8, 3)[0], nn.AdaptiveAvgPool2d)
    assert len(blocks_of(DSCNN((1, 8, 8), 3, (4, 8, 8))).blocks) == 3  # the stem, then each separable block whole
    with pytest.raises(ValueError, match="early_exit: cannot see blocks in a Sequential; exit heads go on"):
        blocks_of(nn.Sequential(nn.Linear(4, 2)))
    with pytest.raises(ValueError, match=r"compress.early_exit.exits: \[2\] must name blocks 0..1"):
        EarlyExitModel(MLP(8, 3, (16, 16, 16)), [2], 3, {"input": torch.zeros(1, 8)})


def test_a_confident_sample_leaves_early_and_answers_do_not_depend_on_the_batch(trained):
    ee, X, _ = trained
    probs = exit_probs(ee, table_part(X))
    ee.threshold.fill_(0.9)
    where = first_confident(probs, 0.9)
    assert (where == 0).any() and (where == len(probs) - 1).any()  # some leave at the first head, some run to the end
    with torch.inference_mode():
        batched = ee(input=torch.as_tensor(X))
        one_by_one = torch.cat([ee(input=torch.as_tensor(X[i:i + 1])) for i in range(len(X))])
        exit_logits = ee.exit_logits(input=torch.as_tensor(X))
    torch.testing.assert_close(batched, one_by_one)
    chosen = torch.stack(exit_logits)[where, torch.arange(len(X))]
    torch.testing.assert_close(batched, chosen)  # each answer is its first confident exit's logits
    confident = where < len(probs) - 1
    agree = (chosen.argmax(-1) == exit_logits[-1].argmax(-1))[confident].double().mean()
    assert agree > 0.97  # on confident samples, the same class as the full model


def test_the_exported_onnx_model_routes_like_pytorch(trained, tmp_path):
    import onnx

    ee, X, _ = trained
    ee.threshold.fill_(0.9)
    path = export_onnx(ee, table_contract(16, 3), tmp_path / "ee.onnx", ExportConfig())
    assert "If" in {n.op_type for n in onnx.load(str(path)).graph.node}
    session = tuned_session(path, threads=1)
    for batch in (X[:1], X[5:6], X[:64]):
        (got,) = session.run(None, rows(batch))
        with torch.inference_mode():
            np.testing.assert_allclose(got, ee(input=torch.as_tensor(batch)).numpy(), rtol=1e-4, atol=1e-5)


def test_a_cnn_with_pooled_exit_heads_exports_with_parity(tmp_path):
    from optforge.tasks.techniques.onnx.export import max_abs_diff

    torch.manual_seed(0)
    x = torch.randn(6, 64)
    ee = EarlyExitModel(DSCNN((1, 8, 8), 3, (4, 8, 8)).eval(), None, 3, {"input": x[:1]}, threshold=0.4).eval()
    path = export_onnx(ee, table_contract(64, 3, (1, 8, 8)), tmp_path / "cnn.onnx", ExportConfig())
    assert max_abs_diff(ee, path, rows(x.numpy())) < 1e-5


def test_a_bert_exits_after_its_layers_and_exports_its_routing(tmp_path):
    from optforge.tasks.techniques.contract import text_contract
    from optforge.tasks.techniques.onnx.export import max_abs_diff
    from tests.techniques.helpers import tiny_bert

    bert = tiny_bert(layers=2)
    contract = text_contract(16, 3, {})
    ids = torch.randint(5, 60, (8, 16))
    mask = torch.ones_like(ids)
    mask[4:, 10:] = 0  # padded rows: the additive mask must reach every layer
    inputs = {"input_ids": ids, "attention_mask": mask}
    ee = EarlyExitModel(bert, None, 3, inputs).eval()
    assert ee.exits == [0]
    with torch.inference_mode():  # the cut model is the model: its own head's logits are BERT's
        torch.testing.assert_close(ee.exit_logits(**inputs)[-1], bert(**inputs).logits, rtol=1e-4, atol=1e-5)
        ee.threshold.fill_(0.34)  # three classes: some rows are sure enough at the first head, some not
        probs = [o.softmax(-1) for o in ee.exit_logits(**inputs)]
        where = first_confident(probs, 0.34)
        torch.testing.assert_close(ee(**inputs), torch.stack(ee.exit_logits(**inputs))[where, torch.arange(8)])
    path = export_onnx(ee, contract, tmp_path / "bert.onnx", ExportConfig())
    assert max_abs_diff(ee, path, {k: v.numpy() for k, v in inputs.items()}) < 1e-4
    import onnx

    from optforge.tasks.techniques.onnx.export import STACK_TRACE

    branch = next(n for n in onnx.load(str(path)).graph.node if n.op_type == "If").attribute[1].g
    # the exporter's stack traces repeat in every nested branch (17 of 23 MB in a 6-layer BERT): dropped
    assert branch.node and not any(p.key == STACK_TRACE for n in branch.node for p in n.metadata_props)


def test_the_curve_and_the_chosen_threshold(trained):
    ee = trained[0]
    Xv, yv = _blobs(300, 1)
    probs = exit_probs(ee, table_part(Xv, yv))
    latencies = exit_latencies_ms(ee, rows(Xv[:1]), repeats=5)
    assert len(latencies) == len(ee.exits) + 1
    rows_ = curve(probs, yv, [1.0, 2.0, 3.0], [0.5, 0.9, 0.999])
    full = rows_[-1]
    assert full["threshold"] == NEVER and full["shares"][-1] == 1.0 and full["expected_latency_ms"] == 3.0
    assert rows_[0]["expected_latency_ms"] <= rows_[1]["expected_latency_ms"] <= rows_[2]["expected_latency_ms"]
    assert all(abs(sum(r["shares"]) - 1) < 1e-9 for r in rows_)
    pick = choose_threshold(rows_, 1.0)
    assert pick["accuracy"] >= full["accuracy"] - 1.0
    assert all(r["expected_latency_ms"] >= pick["expected_latency_ms"] for r in rows_ if r["accuracy"] >= full["accuracy"] - 1)
    assert choose_threshold(rows_, 0.0)["accuracy"] >= full["accuracy"]


def test_bad_settings_are_config_errors():
    from pydantic import ValidationError

    for bad in ({"threshold": 0}, {"threshold": 1.5}, {"thresholds": [0.5, 1.2]}, {"accuracy_budget": -1}):
        with pytest.raises(ValidationError, match=next(iter(bad))):
            EarlyExitConfig(**bad)
    EarlyExitConfig(threshold=1.0)
