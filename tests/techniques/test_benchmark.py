import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from pydantic import ValidationError
from torch import nn

from optforge.tasks.techniques.contract import table_contract
from optforge.tasks.techniques.measurement.benchmark import (
    BenchmarkConfig,
    count_params_onnx,
    count_params_torch,
    cpu_model,
    measure,
    size_mb,
    torch_predictor,
)
from optforge.tasks.techniques.onnx.export import ExportConfig, export_onnx
from optforge.tasks.techniques.onnx.ort_session import onnx_predictor, tuned_session
from tests.techniques.helpers import rows, table_part

F, C = 16, 4
KEYS = {"accuracy", "latency_ms_p50_b1", "latency_ms_p95_b1", "latency_ms_mean_b1", "throughput_sps_b64"}
FAST = BenchmarkConfig(warmup=2, iters_b1=20, batch_size=8, iters_batch=3)


def toy_data(n=512, seed=0):
    """Linearly separable: the label is the arg-max of a fixed random projection."""
    X = np.random.default_rng(seed).normal(size=(n, F)).astype(np.float32)
    y = (X @ np.random.default_rng(1234).normal(size=(F, C))).argmax(1)  # same projection for every seed
    return X, y


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    X, y = toy_data()
    net = nn.Sequential(nn.Linear(F, 64), nn.ReLU(), nn.Linear(64, C))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(net(torch.from_numpy(X)), torch.from_numpy(y)).backward()
        opt.step()
    return net.eval()


@pytest.fixture(scope="module")
def onnx_path(model, tmp_path_factory):
    return export_onnx(model, table_contract(F, C), tmp_path_factory.mktemp("bench") / "model.onnx", ExportConfig())


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_measure_torch_returns_exact_keys_and_true_accuracy(model):
    X, y = toy_data(300, seed=1)
    metrics = measure(torch_predictor(model, threads=1), table_part(X, y), FAST)
    assert set(metrics) == KEYS
    assert all(isinstance(v, float) and v > 0 for v in metrics.values())
    with torch.no_grad():
        expected = 100.0 * (model(torch.from_numpy(X)).argmax(1).numpy() == y).mean()
    assert metrics["accuracy"] == pytest.approx(expected)
    assert metrics["accuracy"] > 90  # the toy model learned, so a wrong argmax axis would show
    assert metrics["latency_ms_p95_b1"] >= metrics["latency_ms_p50_b1"]
    assert torch.get_num_threads() == 1


def test_measure_calls_with_cycled_rows_and_configured_batch():
    X = np.arange(3 * F, dtype=np.float32).reshape(3, F)
    y = np.array([0, 1, 1])
    shapes, firsts = [], []

    def predict(batch):
        x = batch["input"]
        shapes.append(x.shape)
        firsts.append(float(x[0, 0]))
        logits = np.zeros((len(x), C), np.float32)
        logits[:, 1] = 1.0  # always class 1: 2 of 3 right
        return logits

    cfg = BenchmarkConfig(warmup=2, iters_b1=5, batch_size=10, iters_batch=4)
    metrics = measure(predict, table_part(X, y), cfg)
    assert metrics["accuracy"] == pytest.approx(200 / 3)
    assert shapes == [(3, F)] + [(1, F)] * 7 + [(10, F)] * 6  # accuracy, warmup+timed b1, warmup+timed batch
    # Batch-1 rows are the part's rows in turn, cycled: warm-up on rows 0, 1, then timed on 0, 1, 2, 0, 1.
    assert firsts[1:8] == [X[i, 0] for i in (0, 1, 0, 1, 2, 0, 1)]
    assert metrics["throughput_sps_b64"] > 0


def test_measure_rejects_an_empty_split():
    with pytest.raises(ValueError, match="benchmark: the test split is empty"):
        measure(lambda b: np.zeros((len(b["input"]), C)), table_part(np.zeros((0, F))), FAST)


@pytest.mark.parametrize("level", ["disable", "all"])
def test_ort_predictor_matches_torch_and_pins_threads(model, onnx_path, level):
    cfg = FAST.model_copy(update={"graph_optimization": level, "threads": 2})
    X, y = toy_data(100, seed=2)
    ort_logits = onnx_predictor(onnx_path, cfg.threads, cfg.graph_optimization)(rows(X))
    np.testing.assert_allclose(ort_logits, torch_predictor(model, 2)(rows(X)), atol=1e-4)
    opts = tuned_session(onnx_path, cfg.threads, cfg.graph_optimization).get_session_options()
    assert (opts.intra_op_num_threads, opts.inter_op_num_threads) == (2, 1)
    expected_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    assert opts.graph_optimization_level == expected_level[level]
    metrics = measure(onnx_predictor(onnx_path, cfg.threads, cfg.graph_optimization), table_part(X, y), cfg)
    assert set(metrics) == KEYS and metrics["accuracy"] > 90


def test_ort_predictor_names_a_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.onnx"):
        onnx_predictor(tmp_path / "nope.onnx", FAST.threads)


def test_sizes_and_params(model, onnx_path, tmp_path):
    blob = tmp_path / "blob.bin"
    blob.write_bytes(b"\0" * 1_234_567)
    assert size_mb(blob) == 1.2346
    assert count_params_torch(model) == F * 64 + 64 + 64 * C + C
    assert count_params_onnx(onnx_path) == count_params_torch(model)


def test_cpu_model_is_a_name():
    name = cpu_model()
    assert isinstance(name, str) and name.strip() == name and name


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("threads", 0),
        ("warmup", -1),
        ("iters_b1", 0),
        ("batch_size", 0),
        ("iters_batch", 0),
        ("graph_optimization", "max"),
    ],
)
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValidationError, match=field):
        BenchmarkConfig(**{field: value})


def test_config_rejects_unknown_keys_and_round_trips():
    with pytest.raises(ValidationError, match="n_threads"):
        BenchmarkConfig(n_threads=2)
    cfg = BenchmarkConfig(threads=2, warmup=0, iters_b1=5, batch_size=3, iters_batch=2, graph_optimization="basic")
    assert BenchmarkConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
