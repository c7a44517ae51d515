"""Engine stages against a real MLflow store: static INT8, FP16, TVM, the TensorRT skip path, and their benchmark."""

import math

import mlflow
import pytest
import torch
from mlflow import MlflowClient
from prefect.states import State

from optforge.flows.engines import EnginesConfig, engine_variants
from optforge.flows.onnx_config import OnnxConfig
from optforge.tasks.runtime.refs import Format, ModelRef, file_sha256
from optforge.tasks.runtime.tracking import configure
from optforge.tasks.stages.benchmark import benchmark
from optforge.tasks.stages.data import prepare_data
from optforge.tasks.stages.export import export
from optforge.tasks.stages.fp16 import convert_to_fp16
from optforge.tasks.stages.static import quantize_static
from optforge.tasks.stages.tensorrt import _int8_for_tensorrt, build_engines
from optforge.tasks.stages.tvm import compile_tvm
from optforge.tasks.techniques.data.data import DataConfig, load_splits
from optforge.tasks.techniques.engines.tensorrt import TensorRTConfig, environment, unavailable_reason
from optforge.tasks.techniques.engines.tvm import TvmConfig
from optforge.tasks.techniques.engines.tvm import unavailable_reason as tvm_unavailable
from optforge.tasks.techniques.measurement.benchmark import BenchmarkConfig
from optforge.tasks.techniques.models.models import ModelConfig, ModelSpec, save_model
from optforge.tasks.techniques.models.rebuild import build_model
from optforge.tasks.techniques.onnx.export import ExportConfig
from optforge.tasks.techniques.onnx.fp16 import Fp16Config
from optforge.tasks.techniques.onnx.static import StaticQuantConfig

FAST_BENCH = BenchmarkConfig(warmup=2, iters_b1=10, iters_batch=2)
NO_GPU = pytest.mark.skipif(unavailable_reason() is None, reason="CUDA and tensorrt present: engines get built, not skipped")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One MLflow store for the module, selected the way users do it (environment variable)."""
    root = tmp_path_factory.mktemp("engines")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.chdir(root)
        configure("engines")
        yield uri, root
    if mlflow.active_run():
        mlflow.end_run()


@pytest.fixture(scope="module")
def inputs(store):
    """The digits split, a quickly trained MLP and its ONNX export: built once, shared by the tests."""
    _, root = store
    work = str(root / "work")
    with mlflow.start_run(run_name="setup") as setup:
        data = prepare_data.fn(DataConfig(), None, work, setup.info.run_id)
        splits = load_splits(data.path)
        spec = ModelSpec(ModelConfig(hidden=(64,)).to_dict(), data.contract)
        torch.manual_seed(0)
        model = build_model(spec)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        X, y = torch.tensor(splits.train.inputs["input"]), torch.tensor(splits.train.labels)
        for _ in range(150):  # full-batch steps: ~96% on digits in well under a second
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(X), y).backward()
            opt.step()
        folder = save_model(model.eval(), spec, root / "model")
        torch_ref = ModelRef("pytorch_fp32", Format.TORCH, str(folder), file_sha256(folder))
        onnx_ref = export.fn(ExportConfig(), torch_ref, data, work, setup.info.run_id)
    return data, torch_ref, onnx_ref, work


@pytest.fixture
def exported(store, inputs):
    """A fresh parent run per test, so each test sees only its own child runs."""
    with mlflow.start_run(run_name="parent") as parent:
        yield parent.info.run_id, *inputs


def _children(client, parent_id, stage):
    exp = mlflow.get_experiment_by_name("engines").experiment_id
    return client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent_id}' and tags.`optforge.stage` = '{stage}'")


@NO_GPU
def test_engine_stages_log_runs_and_benchmark_side_by_side(exported, store):
    pid, data, torch_ref, onnx_ref, work = exported
    client = MlflowClient(store[0])
    # A budget the gate passes on any CPU (INT8 cost this model 0.4 points, 1 validation row), so the run shows no fallback.
    static = quantize_static.fn(StaticQuantConfig(calibration_samples=128, accuracy_budget=5), onnx_ref, data, work, pid)
    fp16 = convert_to_fp16.fn(Fp16Config(), onnx_ref, work, pid)
    state = build_engines.fn(TensorRTConfig(), StaticQuantConfig(), Fp16Config(), onnx_ref, data, work, environment(), pid)
    assert isinstance(state, State) and "skipped trt_fp16, trt_int8" in state.message
    trt = state.result()
    assert [(r.name, r.format) for r in trt] == [("trt_fp16", "skipped"), ("trt_int8", "skipped")]
    assert trt[0].info["skip_reason"] == unavailable_reason() and all(r.exists() for r in trt)

    (q_run,) = _children(client, pid, "static")
    assert q_run.data.tags["optforge.excluded_nodes"] == "none" and q_run.data.tags["optforge.gate_passed"] == "true"
    assert q_run.data.metrics["qdq_nodes"] > 0 and q_run.data.params["static.method"] == "minmax"
    assert {a.path for a in client.list_artifacts(q_run.info.run_id)} == {"fallback.json", "onnx"}
    (t_run,) = _children(client, pid, "tensorrt")
    assert t_run.info.status == "FINISHED" and t_run.data.tags["optforge.skipped"] == unavailable_reason()

    results = benchmark.fn(FAST_BENCH, [torch_ref, onnx_ref, static, fp16, *trt], data, pid)
    metrics = {r.name: r.metrics for r in results}
    assert metrics["onnx_int8_static"]["accuracy"] >= metrics["onnx_fp32"]["accuracy"] - 2
    assert metrics["onnx_int8_static"]["size_mb"] < 0.5 * metrics["onnx_fp32"]["size_mb"]
    assert math.isnan(metrics["trt_int8"]["latency_ms_p50_b1"]) and metrics["trt_int8"]["params"] > 0
    runs = {r.data.tags["optforge.variant"]: r for r in _children(client, pid, "benchmark")}
    assert runs["trt_fp16"].data.tags["optforge.skipped"] == unavailable_reason()
    ort = runs["onnx_int8_static"].data.params
    assert ort["runtime.intra_op_threads"] == "1" and ort["runtime.graph_optimization"] == "all"
    assert [a.path for a in client.list_artifacts(runs["onnx_fp32"].info.run_id, "runtime")] == ["runtime/onnx_fp32_ort_all.onnx"]


def test_engine_variants_follow_the_config(exported):
    pid, data, torch_ref, onnx_ref, work = exported

    def stage(task, **kwargs):  # what the flow's StageRunner does, minus Prefect
        out = task.fn(**kwargs, parent_run_id=pid)
        return out.result() if isinstance(out, State) else out

    onnx = OnnxConfig.from_dict({"fp16": {"enabled": False}})
    cfg = EnginesConfig.from_dict({"tensorrt": {"precisions": ["int8"]}, "tvm": {"enabled": True, "trials": 0,
                                                                                  "batch_sizes": [1]}})
    variants = engine_variants(onnx, cfg, onnx_ref, torch_ref, data, work, stage)
    names = [v.name for v in variants]
    gpu = ["pytorch_fp16_cuda", "pytorch_bf16_cuda", "pytorch_fp16_compile_cuda"] if torch.cuda.is_available() else []
    assert names == ["onnx_int8_static", "trt_int8", "tvm_llvm", *gpu]
    assert variants[2].format == (Format.SKIPPED if tvm_unavailable() else Format.TVM)
    if not gpu:
        assert "CUDA is not available" in mlflow.get_run(pid).data.tags["optforge.torch_gpu.skipped"]
    none = EnginesConfig.from_dict({k: {"enabled": False} for k in ("tensorrt", "tvm", "torch_gpu")})
    no_onnx = OnnxConfig.from_dict({k: {"enabled": False} for k in ("static", "fp16")})
    assert engine_variants(no_onnx, none, onnx_ref, torch_ref, data, work, stage) == []


def test_calibration_larger_than_the_training_split_uses_all_its_rows_and_says_so(exported, store):
    # Since the input contract, asking for more rows than the training split has calibrates on all of it
    # (a small dataset must still quantize) and records the scaling, instead of failing.
    pid, data, _, onnx_ref, work = exported
    out = quantize_static.fn(StaticQuantConfig(calibration_samples=100_000), onnx_ref, data, work, pid)
    assert out.exists()
    rows = data.sizes["train"]
    (run,) = _children(MlflowClient(store[0]), pid, "static")
    assert run.data.tags["optforge.scaled.calibration_samples"] == f"100000 -> {rows} (the training split's rows)"
    assert run.data.params["calibration_samples_used"] == str(rows)


def test_tensorrt_gets_symmetric_signed_int8():
    cfg = _int8_for_tensorrt(StaticQuantConfig(method="entropy", calibration_samples=64))
    assert (cfg.activation_type, cfg.symmetric_activations, cfg.per_channel) == ("qint8", True, True)
    assert (cfg.method, cfg.calibration_samples) == ("entropy", 64)


def test_engines_config_round_trips_through_yaml():
    import yaml

    cfg = EnginesConfig.from_dict({"tensorrt": {"precisions": ["fp16"]}})
    assert EnginesConfig.from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict()))) == cfg
    assert set(EnginesConfig().to_dict()) == {"tensorrt", "tvm", "torch_gpu"}  # ONNX transforms live in onnx:
    with pytest.raises(ValueError, match="static_int8 is now onnx.static"):  # an old key names its new one
        EnginesConfig.from_dict({"static_int8": {"method": "percentile"}})


@pytest.mark.skipif(tvm_unavailable() is not None, reason=f"{tvm_unavailable()}")
def test_tvm_variant_is_compiled_logged_and_benchmarked_beside_onnx(exported, store):
    pid, data, _, onnx_ref, work = exported
    client = MlflowClient(store[0])
    state = compile_tvm.fn(TvmConfig(enabled=True, trials=0, batch_sizes=(1, 8)), onnx_ref, data, work, pid)
    assert isinstance(state, State) and state.message.startswith("compiled tvm_llvm (untuned")
    ref = state.result()
    assert (ref.name, ref.format) == ("tvm_llvm", Format.TVM) and ref.info["parity"]["max_abs_diff"] < 1e-3
    (run,) = _children(client, pid, "tvm")
    m = run.data.metrics
    assert m["compile_s"] > 0 and m["tune_s"] == 0 and m["trials"] == 0 and m["parity_top1_agreement"] == 1.0
    assert run.data.params["tvm.batch_sizes"] == "[1, 8]" and run.data.tags["optforge.tvm.version"].startswith("0.27")
    assert {a.path for a in client.list_artifacts(run.info.run_id, "tvm")} == {
        "tvm/tvm.json", "tvm/model_b1.so", "tvm/model_b8.so"}

    results = {r.name: r.metrics for r in benchmark.fn(FAST_BENCH, [onnx_ref, ref], data, pid)}
    assert abs(results["tvm_llvm"]["accuracy"] - results["onnx_fp32"]["accuracy"]) < 0.5
    assert results["tvm_llvm"]["latency_ms_p50_b1"] > 0 and results["tvm_llvm"]["throughput_sps_b64"] > 0
    assert results["tvm_llvm"]["size_mb"] > 0 and results["tvm_llvm"]["params"] == results["onnx_fp32"]["params"]


def test_tvm_without_the_package_is_a_skipped_variant_with_the_reason(exported, store, monkeypatch):
    import optforge.tasks.stages.tvm as stage

    pid, data, _, onnx_ref, work = exported
    monkeypatch.setattr(stage, "unavailable_reason", lambda: "no tvm here")
    ref = compile_tvm.fn(TvmConfig(enabled=True), onnx_ref, data, work, pid).result()
    assert (ref.name, ref.format, ref.info["skip_reason"]) == ("tvm_llvm", Format.SKIPPED, "no tvm here")
    (run,) = _children(MlflowClient(store[0]), pid, "tvm")
    assert run.data.tags["optforge.skipped"] == "no tvm here"
