"""The register task against a real MLflow SQLite store: champion, challenger, pyfunc loading.

Models are single-layer ONNX graphs built with onnx.helper (no training, no torch export) on data
that they classify perfectly, so accuracies are known; latencies are hand-made metrics, so every
champion/challenger case is decided by the numbers the test sets.
"""


import mlflow
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from mlflow import MlflowClient
from onnx import TensorProto, helper, numpy_helper

from optforge.tasks.runtime.refs import DataRef, Format, ModelRef, VariantResult
from optforge.tasks.runtime.tracking import configure
from optforge.tasks.stages.register import RegistryOutcome, register
from optforge.tasks.techniques.contract import table_contract
from optforge.tasks.techniques.data.data import Part, Splits, load_splits, save_splits
from optforge.tasks.techniques.measurement.selection import RegisterConfig

NAME = "registry-test"
CFG = RegisterConfig(model_name=NAME, baseline="onnx_fp32")
RNG = np.random.default_rng(0)
W = RNG.normal(size=(8, 3)).astype(np.float32)


def linear_onnx(path, weight: np.ndarray) -> ModelRef:
    """logits = input @ weight, as an .onnx file with a dynamic batch dimension (the table contract's input name)."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "W"], ["logits"])],
        "linear",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", weight.shape[0]])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", weight.shape[1]])],
        [numpy_helper.from_array(weight, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return ModelRef(path.stem, Format.ONNX, str(path), f"sha-{path.stem}")


@pytest.fixture
def data(tmp_path) -> DataRef:
    X = RNG.normal(size=(300, 8)).astype(np.float32)
    y = (X @ W).argmax(1).astype(np.int64)  # W classifies every row correctly: 100 % accuracy
    contract = table_contract(8, 3)
    splits = Splits(contract, Part({"input": X[:200]}, y[:200]), Part({"input": X[200:250]}, y[200:250]),
                    Part({"input": X[250:]}, y[250:]))
    path = save_splits(splits, tmp_path / "splits")
    return DataRef(str(path), "fingerprint-1", contract.to_dict())


def variants(tmp_path, tag: str) -> list[ModelRef]:
    return [linear_onnx(tmp_path / f"onnx_fp32-{tag}.onnx", W), linear_onnx(tmp_path / f"onnx_small-{tag}.onnx", W)]


def run_pipeline(
    tmp_path,
    data,
    tag: str,
    small_latency: float,
    small_acc: float = 100.0,
    base_acc: float = 100.0,
    cfg: RegisterConfig = CFG,
) -> tuple[RegistryOutcome, str]:
    """One 'pipeline run': a parent run, two benchmarked variants (hand-made metrics), the register task."""
    refs = [
        ModelRef(n, r.format, r.path, r.sha256) for n, r in zip(("onnx_fp32", "onnx_small"), variants(tmp_path, tag))
    ]
    results = [
        VariantResult(
            "onnx_fp32",
            {
                "accuracy": base_acc,
                "latency_ms_p50_b1": 1.0,
                "latency_ms_p95_b1": 1.2,
                "throughput_sps_b64": 100.0,
                "size_mb": 1.0,
                "params": 24.0,
            },
        ),
        VariantResult(
            "onnx_small",
            {
                "accuracy": small_acc,
                "latency_ms_p50_b1": small_latency,
                "latency_ms_p95_b1": small_latency * 1.2,
                "throughput_sps_b64": 200.0,
                "size_mb": 0.5,
                "params": 24.0,
            },
        ),
    ]
    configure("registry")
    with mlflow.start_run(run_name=f"parent-{tag}") as parent:
        outcome = register.fn(cfg, results, refs, data, parent.info.run_id, config_hash=f"hash-{tag}")
    return outcome, parent.info.run_id


def test_champion_then_challenger_then_new_champion(tmp_path, data, mlflow_store):
    client = MlflowClient(mlflow_store)
    first, _ = run_pipeline(tmp_path, data, "a", small_latency=0.5)
    assert (first.version, first.alias, first.variant) == ("1", "champion", "onnx_small")
    assert "first version of registry-test" in first.reason
    tags = client.get_model_version(NAME, "1").tags
    assert tags["config_hash"] == "hash-a" and tags["data_fingerprint"] == "fingerprint-1"
    assert tags["chain"] == "onnx_small" and tags["latency_ms_p50_b1"] == "0.5" and tags["accuracy"] == "100"
    assert tags["data_kind"] == "table" and tags["inputs"] == "input" and len(tags["input_contract"]) == 16

    worse, _ = run_pipeline(tmp_path, data, "b", small_latency=0.8)
    assert (worse.version, worse.alias, worse.compared_with) == ("2", "challenger", "1")
    assert (
        "not better than champion v1" in worse.decision and "accuracy 100.00% vs 100.00% on this data" in worse.decision
    )
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "1"

    better, _ = run_pipeline(tmp_path, data, "c", small_latency=0.3)
    assert (better.version, better.alias, better.compared_with) == ("3", "champion", "1")
    assert client.get_registered_model(NAME).aliases == {"champion": 3, "challenger": 2}  # versions as ints
    assert client.get_model_version(NAME, "1").tags["replaced_by"] == "3"

    # Faster still, but 2 points below the champion's accuracy re-measured on this data (100 %): gated.
    gated, _ = run_pipeline(tmp_path, data, "d", small_latency=0.01, small_acc=98.0, base_acc=98.5)
    assert gated.alias == "challenger" and "below the gate 99.00%" in gated.decision
    assert client.get_registered_model(NAME).aliases == {"champion": 3, "challenger": 4}


def test_champion_loads_through_pyfunc_and_matches_onnx_runtime(tmp_path, data, mlflow_store):
    outcome, _ = run_pipeline(tmp_path, data, "a", small_latency=0.5)
    X = np.asarray(load_splits(data.path).test.inputs["input"])
    logits = mlflow.pyfunc.load_model(f"models:/{NAME}@champion").predict(X)
    assert isinstance(logits, np.ndarray) and logits.shape == (50, 3)  # an array for every format, no {name: array}
    session = ort.InferenceSession(str(tmp_path / "onnx_small-a.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(logits, session.run(None, {"input": X})[0], rtol=1e-6, atol=1e-6)
    assert outcome.version == "1"


def test_nothing_registered_when_no_variant_meets_the_goals(tmp_path, data, mlflow_store):
    outcome, _ = run_pipeline(
        tmp_path, data, "a", small_latency=0.5, cfg=CFG.model_copy(update={"max_latency_ms": 0.1})
    )
    assert outcome.version is None and outcome.alias is None and outcome.reason.startswith("no variant meets the goals")
    assert MlflowClient(mlflow_store).search_registered_models() == []
    record = mlflow.artifacts.load_dict(f"runs:/{outcome.run_id}/selection.json")
    assert record["selection"]["chosen"] is None and "0.5 ms > 0.1 ms" in record["selection"]["verdicts"]["onnx_small"]


def test_engine_formats_are_skipped_for_registration(tmp_path, data, mlflow_store):
    refs = variants(tmp_path, "e")
    refs = [ModelRef("onnx_fp32", Format.ONNX, refs[0].path, "x"), ModelRef("trt_fp16", Format.TENSORRT, "/nowhere.engine", "y")]
    metrics = {"accuracy": 100.0, "latency_ms_p95_b1": 1.0, "throughput_sps_b64": 1.0, "size_mb": 1.0, "params": 1.0}
    results = [
        VariantResult("onnx_fp32", metrics | {"latency_ms_p50_b1": 1.0}),
        VariantResult("trt_fp16", metrics | {"latency_ms_p50_b1": 0.1}),
    ]
    configure("registry")
    with mlflow.start_run() as parent:
        outcome = register.fn(CFG, results, refs, data, parent.info.run_id)
    assert outcome.variant == "onnx_fp32" and outcome.alias == "champion"
