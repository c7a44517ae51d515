"""Compression chains: the config's rules, the wiring (fake stage runner), and one end-to-end run with Ray."""

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml
from mlflow import MlflowClient

from optforge.flows.chains import CompressConfig, chain_variants, expand, product_name
from optforge.flows.params import ConfigError, PipelineConfig, load_config
from optforge.tasks.runtime.refs import Format, ModelRef, file_sha256
from optforge.tasks.runtime.tracking import configure
from optforge.tasks.stages.data import prepare_data
from optforge.tasks.techniques.data.data import DataConfig
from optforge.tasks.techniques.models.models import ModelConfig, ModelSpec, save_model
from optforge.tasks.techniques.models.rebuild import build_model, load_model
from optforge.tasks.techniques.onnx.static import count_qdq_nodes
from tests.conftest import TINY


@pytest.mark.parametrize("chains, message", [
    ("[[distil, quantize]]", ("compress.chains.0.0: Input should be 'distill', 'prune', 'factorize', 'cluster', "
                              "'binarize', 'circulant', 'early_exit', 'export', 'fuse', 'quantize', 'static' or 'qat' (got 'distil')")),
    ("[[distill, qat, quantize]]", "quantize cannot follow qat: quantize takes onnx"),
    ("[[circulant, prune]]", "prune cannot follow circulant"),
    ("[[prune], [factorize, Quantize]]", "compress.chains.1.1: Input should be"),
    ("[[quantize]]", "compress.chains: Value error, chain 0 ['quantize'] needs at least one of"),
    ("[[prune, distill]]", "distill cannot follow prune: distill takes teacher"),
    ("[[prune, quantize, factorize]]", "factorize cannot follow quantize"),
    ("[[prune, quantize, export]]", "export cannot follow quantize"),
    ("[[prune, export, fuse]]", "fuse cannot follow export"),
    ("[[prune, quantize, fuse]]", "(what may follow it: nothing)"),
    ("[[prune, prune]]", "repeats a step"),
    ("[[prune, quantize], [prune, export, quantize]]", "chain 1 ['prune', 'export', 'quantize'] builds the same variant"),
    ("[[factorize, prune]]", "prunes structurally after factorizing"),
])
def test_bad_chains_name_the_field(chains, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"compress.chains={chains}"])
    assert message in str(err.value)


def test_chain_config_round_trips_and_unstructured_may_follow_factorize():
    cfg = load_config(None, ["compress.chains=[[factorize, prune, export]]", "compress.prune.method=unstructured"])
    assert cfg.compress.chains == (("factorize", "prune", "export"),)
    assert CompressConfig.from_dict(json.loads(json.dumps(cfg.compress.to_dict()))) == cfg.compress
    assert CompressConfig.from_dict(yaml.safe_load(yaml.safe_dump(cfg.compress.to_dict()))) == cfg.compress
    assert load_config(None, ["compress.chains=[]"]).compress.chains == ()
    for field, value, name in [("prune.sparsity", 1.0, "compress.prune.sparsity"),
                               ("factorize.energy", 0, "compress.factorize.energy"),
                               ("distill.alpha", 2, "compress.distill.alpha")]:
        with pytest.raises(ConfigError, match=name):
            load_config(None, [f"compress.{field}={value}"])


def test_names():
    assert expand(("distill", "quantize")) == ("distill", "export", "quantize")
    assert product_name(expand(("distill", "prune", "quantize"))) == "distill-prune-int8"
    assert product_name(("factorize", "export"), "_") == "factorize_onnx"
    assert expand(("distill", "fuse", "quantize")) == ("distill", "fuse", "quantize")  # fuse exports its own graph
    assert product_name(("distill", "fuse", "quantize"), "_") == "distill_fused_int8"
    assert product_name(("distill", "fuse"), "_") == "distill_fused"
    assert expand(("distill", "qat")) == ("distill", "qat")  # QAT exports its own QDQ INT8 model
    assert product_name(("distill", "qat"), "_") == "distill_qat_int8" and product_name(("qat",), "_") == "qat_int8"
    assert expand(("prune", "static")) == ("prune", "export", "static")  # static INT8 of the pruned model's export
    assert product_name(expand(("prune", "static")), "_") == "prune_static_int8"
    assert product_name(("distill",)) == "distill"


@pytest.fixture
def teacher(mlflow_store, tmp_path):
    configure("chains")
    with mlflow.start_run(run_name="parent") as parent:
        data = prepare_data.fn(DataConfig(), None, str(tmp_path / "work"), parent.info.run_id)
        spec = ModelSpec(ModelConfig(hidden=(32, 32)).to_dict(), data.contract)
        torch.manual_seed(0)
        folder = save_model(build_model(spec), spec, tmp_path / "teacher")
        yield parent.info.run_id, data, ModelRef("pytorch_fp32", Format.TORCH, str(folder), file_sha256(folder), "t-run")


def test_chain_variants_share_prefixes_and_carry_lineage(teacher, tmp_path):
    parent_id, data, ref = teacher
    calls = []

    def stage(task, **kwargs):  # the flow's StageRunner without Prefect: run the task body directly
        calls.append(task.name)
        return task.fn(**kwargs, parent_run_id=parent_id)

    quick = {"finetune": {"epochs": 1}}
    cfg = CompressConfig.from_dict({"chains": [["prune", "quantize"], ["prune"], ["prune", "factorize", "export"],
                                               ["prune", "static"]],
                                    "prune": quick, "factorize": {**quick, "mode": "ratio", "rank_ratio": 0.25}})
    variants = chain_variants(PipelineConfig(compress=cfg), ref, data, str(tmp_path / "work"), stage)
    assert [v.name for v in variants] == ["prune_int8", "prune", "prune_factorize_onnx", "prune_static_int8"]
    assert calls == ["prune", "prune-onnx", "prune-int8", "prune-factorize", "prune-factorize-onnx",
                     "prune-static_int8"]  # prune once, export once
    static = variants[3]
    assert static.format == "onnx" and count_qdq_nodes(static.path) > 0 and static.info["flops"] == variants[1].info["flops"]
    int8, pruned, onnx = variants[:3]
    assert int8.format == onnx.format == "onnx" and pruned.format == "torch"
    assert int8.info["flops"] == pruned.info["flops"] > 0  # the ONNX variant keeps its PyTorch source's count
    assert int8.info["lineage"]["chain"] == "prune>quantize"
    runs = dict(s.split(":") for s in int8.info["lineage"]["chain_runs"].split(","))
    assert list(runs) == ["prune", "export", "quantize"] and runs["prune"] == pruned.run_id
    assert int8.info["lineage"]["parent_run"] == runs["export"] and pruned.info["lineage"]["parent_run"] == "t-run"
    assert onnx.path.endswith(".onnx") and onnx.info["lineage"]["chain"] == "prune>factorize>export"
    hidden = [m.out_features for m in load_model(pruned.path)[0].net if isinstance(m, torch.nn.Linear)][:-1]
    assert all(15 <= w <= 16 for w in hidden) and len(hidden) == 2  # 32 -> about half, the zoo MLP plus its history


@pytest.mark.slow
def test_flow_builds_chain_variants_with_lineage_and_caches_them(tmp_path, mlflow_store):
    from optforge.flows.optimize import optimize

    compress = {
        "chains": [["distill", "quantize"], ["distill", "prune"], ["factorize"]],
        "distill": {"student": {"hidden": [16]}, "train": {"epochs": 3, "num_workers": 2, "patience": 0}},
        "prune": {"finetune": {"epochs": 1}}, "factorize": {"mode": "ratio", "rank_ratio": 0.25, "finetune": {"epochs": 1}},
    }
    path = tmp_path / "chains.yaml"
    path.write_text(yaml.safe_dump({**TINY, "compress": compress, "register": {**TINY["register"], "enabled": False},
                                    "tracking": {"experiment": "chains-e2e", "workdir": str(tmp_path / "work")}}))
    first = optimize(config_path=str(path))
    names = [v["variant"] for v in first["variants"]]
    assert {"distill_int8", "distill_prune", "factorize"} <= set(names)
    client = MlflowClient(mlflow_store)
    exp = client.get_experiment_by_name("chains-e2e").experiment_id
    runs = client.search_runs([exp], f"tags.mlflow.parentRunId = '{first['parent_run_id']}'")
    bench = {r.data.tags["optforge.variant"]: r for r in runs if r.data.tags["optforge.stage"] == "benchmark"}
    assert bench["distill_int8"].data.tags["optforge.chain"] == "distill>quantize"
    assert bench["distill_prune"].data.tags["optforge.parent_run"]
    assert bench["factorize"].data.metrics["flops"] > 0
    (distill_run,) = [r for r in runs if r.data.tags["optforge.stage"] == "distill"]
    assert {"retention", "params_ratio", "flops_ratio", "student_accuracy"} <= set(distill_run.data.metrics)
    assert len(client.get_metric_history(distill_run.info.run_id, "val_accuracy")) == 3  # per epoch, from Ray Train
    second = optimize(config_path=str(path))
    assert all(s["cached"] for s in second["stages"])


def test_cluster_and_binarize_chains_store_the_model_bit_packed_and_the_benchmark_reports_that_size(teacher, tmp_path):
    from optforge.tasks.stages.benchmark import load_variant
    from optforge.tasks.techniques.compression.packing import PACKED_FILE, load_packed
    from optforge.tasks.techniques.measurement.benchmark import BenchmarkConfig

    parent_id, data, ref = teacher

    def stage(task, **kwargs):
        return task.fn(**kwargs, parent_run_id=parent_id)

    cfg = CompressConfig.from_dict({"chains": [["cluster"], ["cluster", "quantize"], ["binarize"]],
                                    "cluster": {"bits": 3, "min_weights": 500, "finetune": {"epochs": 1}},
                                    "binarize": {"min_weights": 500, "finetune": {"epochs": 1}}})
    clustered, int8, binary = chain_variants(PipelineConfig(compress=cfg), ref, data, str(tmp_path / "work"), stage)
    assert (clustered.name, int8.name, binary.name) == ("cluster", "cluster_int8", "binarize")
    assert int8.info["lineage"]["chain"] == "cluster>quantize"
    model, _ = load_model(clustered.path)
    big = [m for m in model.net if isinstance(m, torch.nn.Linear) and m.weight.numel() >= 500]
    assert len(big) == 2 and all(len(torch.unique(m.weight)) <= 8 for m in big)  # 64x32 and 32x32
    packed = Path(clustered.path) / PACKED_FILE
    assert load_packed(packed).keys() == model.state_dict().keys()
    loaded = load_variant(clustered, BenchmarkConfig(), tmp_path)
    assert loaded.size_mb == round(packed.stat().st_size / 1e6, 4)
    # 3-bit indices for ~3 k weights: the .npz framing and the float biases weigh on a model this small
    assert packed.stat().st_size < (Path(clustered.path) / "model.pt").stat().st_size / 2
    inner = load_model(binary.path)[0].net[3].weight.detach()  # 32x32, between the float first and last layers
    assert torch.equal(inner.abs(), inner.abs().amax(1, keepdim=True).expand_as(inner))
    assert load_variant(binary, BenchmarkConfig(), tmp_path).size_mb == round(
        (Path(binary.path) / PACKED_FILE).stat().st_size / 1e6, 4)


def test_a_circulant_chain_rebuilds_from_its_spec_and_exports_with_parity(teacher, tmp_path):
    from optforge.tasks.techniques.compression.circulant import BlockCirculantLinear

    parent_id, data, ref = teacher

    def stage(task, **kwargs):
        return task.fn(**kwargs, parent_run_id=parent_id)

    cfg = CompressConfig.from_dict({"chains": [["circulant", "export"]],
                                    "circulant": {"block": 8, "min_features": 32, "finetune": {"epochs": 1}}})
    (onnx_variant,) = chain_variants(PipelineConfig(compress=cfg), ref, data, str(tmp_path / "work"), stage)
    assert onnx_variant.name == "circulant_onnx" and onnx_variant.info["parity_max_abs_diff"] < 1e-4
    assert onnx_variant.info["circulant"] == {"net.0": 8, "net.3": 8}  # 64->32 and 32->32; the classifier stays
    folder = Path(tmp_path / "work").glob("circulant/*/model")
    model, spec = load_model(next(folder))  # rebuilt from model.json's record, weights loaded
    assert spec.applied("circulant") == [{"blocks": {"net.0": 8, "net.3": 8}}] and isinstance(model.net[0], BlockCirculantLinear)


def test_a_block_that_does_not_divide_the_teachers_widths_fails_before_training(tmp_path):
    from optforge.flows.plan import plan
    from optforge.tasks.techniques.contract import table_contract

    cfg = load_config(None, ["compress.chains=[[circulant]]", "compress.circulant.block=48",
                             "compress.circulant.min_features=8"])
    with pytest.raises(ConfigError, match=r"compress.circulant.block: 48 does not divide the widths"):
        plan(cfg, table_contract(64, 10), "digits")


def test_an_early_exit_chain_exports_its_routing_and_records_its_exits(teacher, tmp_path):
    import onnx

    from optforge.tasks.stages.register import _log_onnx
    from optforge.tasks.techniques.compression.early_exit import EarlyExitModel
    from optforge.tasks.techniques.data.data import load_splits

    parent_id, data, ref = teacher

    def stage(task, **kwargs):
        return task.fn(**kwargs, parent_run_id=parent_id)

    cfg = CompressConfig.from_dict({"chains": [["early_exit", "export"], ["early_exit", "quantize"]],
                                    "early_exit": {"finetune": {"epochs": 1}}})
    fp32, int8 = chain_variants(PipelineConfig(compress=cfg), ref, data, str(tmp_path / "work"), stage)
    assert (fp32.name, int8.name) == ("early_exit_onnx", "early_exit_int8")
    for variant in (fp32, int8):  # the routing survives export and dynamic INT8 as If nodes
        assert "If" in {n.op_type for n in onnx.load(variant.path).graph.node}
    branch = next(n for n in onnx.load(int8.path).graph.node if n.op_type == "If").attribute
    assert "MatMulInteger" in {n.op_type for a in branch for n in a.g.node}  # the later blocks are INT8 too
    run = MlflowClient().get_run(fp32.info["lineage"]["parent_run"])
    shares = [run.data.metrics[f"exit_share_{i}"] for i in range(2)]  # two hidden layers: an exit after the first
    assert abs(sum(shares) - 1) < 1e-9 and "expected_latency_ms_b1" in run.data.metrics
    folder = next(Path(tmp_path / "work").glob("early_exit/*/model"))
    model, spec = load_model(folder)
    (exits,) = spec.applied("early_exit")
    assert isinstance(model, EarlyExitModel) and exits["exits"] == [0]
    assert exits["threshold"] == float(run.data.params["early_exit.chosen_threshold"])
    assert fp32.info["parity_max_abs_diff"] < 1e-4
    splits = load_splits(data.path)
    X = splits.test.rows(0, 50)["input"]
    with mlflow.start_run(nested=True):  # the registered form: the pyfunc over the ONNX file
        info = _log_onnx(fp32, data, splits, None)
    served = mlflow.pyfunc.load_model(info.model_uri).predict(X)
    with torch.inference_mode():
        np.testing.assert_allclose(served, model(torch.as_tensor(X)).numpy(), rtol=1e-4, atol=1e-5)


def test_early_exit_is_skipped_for_models_without_blocks_and_bad_exits_fail_before_training(tmp_path):
    from optforge.flows.plan import plan
    from optforge.tasks.techniques.contract import table_contract

    with pytest.raises(ConfigError, match=r"compress.early_exit.exits: \[5\] must name blocks 0..1 of this model.s 3 blocks"):
        plan(load_config(None, ["compress.chains=[[early_exit]]", "compress.early_exit.exits=[5]"]),
             table_contract(64, 10), "digits")
    factory = load_config(None, ["compress.chains=[[early_exit], [prune]]", "model.arch=tests.flows.byo_models:table_net"])
    planned = plan(factory, table_contract(64, 10), "digits")
    assert "early_exit" in planned.skipped["early_exit"] and planned.cfg.compress.chains == (("prune",),)
    for chain, message in [("[[early_exit, prune]]", "prune cannot follow early_exit"),
                           ("[[early_exit, static]]", "static cannot follow early_exit"),
                           ("[[circulant, early_exit, fuse]]", r"\(what may follow it: export, quantize\)")]:
        with pytest.raises(ConfigError, match=message):
            load_config(None, [f"compress.chains={chain}"])
    load_config(None, ["compress.chains=[[circulant, early_exit, export]]"])
