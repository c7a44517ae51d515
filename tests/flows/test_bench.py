"""``optforge bench``: the harness's pure parts on hand-made numbers, then once end to end after ``optimize``."""

import argparse
import json
import math

import numpy as np
import pytest
from mlflow import MlflowClient

from optforge.flows.bench import EXIT_CONFIG, add_parser, cmd_bench, git_commit
from optforge.tasks.techniques.data.data import Part
from optforge.tasks.techniques.measurement.harness import (
    HarnessConfig,
    format_report,
    measure_side_by_side,
    ratios,
    verdicts,
)


def _m(acc, p50, thr):
    return {"accuracy": acc, "latency_ms_p50_b1": p50, "latency_ms_p95_b1": p50 * 1.2, "latency_ms_p99_b1": p50 * 1.5,
            "throughput_sps_b64": thr}


METRICS = {"pytorch_fp32": _m(97.0, 1.0, 6000), "onnx_fp32": _m(97.0, 0.5, 12000),
           "onnx_int8_dynamic": _m(97.2, 0.1, 50000), "onnx_int8_static": _m(95.5, 0.08, 60000)}


def _args(*argv):
    sub = argparse.ArgumentParser().add_subparsers()
    add_parser(sub)
    return sub.choices["bench"].parse_args(list(argv))


def test_ratios_best_and_targets_on_known_numbers():
    rows = {r["comparison"]: r for r in ratios(METRICS, max_drop=1.0)}
    assert rows["ORT FP32 / PyTorch eager"]["speedup_p50_b1"] == pytest.approx(2.0)
    assert rows["static INT8 / ORT FP32"]["throughput_ratio_b64"] == pytest.approx(5.0)
    assert rows["static / dynamic INT8"]["speedup_p50_b1"] == pytest.approx(1.25)
    # static INT8 is fastest but 1.5 points below the baseline: "best" is the dynamic one
    assert rows["best / baseline"]["variant"] == "onnx_int8_dynamic"
    met = {v["comparison"]: v["met"] for v in verdicts(list(rows.values()))}
    assert met == {"ORT FP32 / PyTorch eager": True, "static INT8 / ORT FP32": False}  # 1.5-point drop > 1
    assert "static INT8 / ORT FP32" not in {r["comparison"] for r in ratios({"onnx_fp32": METRICS["onnx_fp32"]})}


def test_interleaved_measurement_and_report_text():
    X = np.random.default_rng(0).normal(size=(20, 4)).astype(np.float32)
    part = Part({"input": X}, X.argmax(1))
    predictors = {"pytorch_fp32": lambda batch: batch["input"], "onnx_fp32": lambda batch: batch["input"] * 2}
    out = measure_side_by_side(predictors, part, HarnessConfig(iters_b1=12, iters_batch=3, rounds=3, warmup=1))
    assert out["onnx_fp32"]["accuracy"] == 100.0
    assert all(0 < m["latency_ms_p50_b1"] <= m["latency_ms_p99_b1"] and m["throughput_sps_b64"] > 0 for m in out.values())
    report = {"machine": {"cpu_model": "Test CPU", "cpu_count": 2, "torch": "t", "onnxruntime": "o"},
              "settings": {"threads": 1, "graph_optimization": "all"}, "commit": "abcdef123456789", "code_version": "c0de",
              "variants": {n: {**m, "size_mb": 1.0} for n, m in METRICS.items()}, "skipped": {"trt_fp16": "no CUDA"},
              "ratios": ratios(METRICS)}
    report["targets"] = verdicts(report["ratios"])
    text = format_report(report, previous={**report, "commit": "0123456789"})
    assert "Test CPU (2 cores), 1 intra-op thread(s)" in text and "trt_fp16: skipped (no CUDA)" in text
    assert "was p50 b1 (01234567)" in text and "static INT8 / ORT FP32 throughput_ratio_b64 >= 1.5" in text
    assert "MISSED" in text and "MET" in text


def test_commit_is_read_without_git(tmp_path):
    (tmp_path / ".git" / "refs" / "heads").mkdir(parents=True)
    (tmp_path / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (tmp_path / ".git" / "packed-refs").write_text("# pack-refs\n" + "ab" * 20 + " refs/heads/main\n")
    assert git_commit(tmp_path) == "ab" * 20
    (tmp_path / ".git" / "refs" / "heads" / "main").write_text("cd" * 20 + "\n")
    assert git_commit(tmp_path) == "cd" * 20
    assert git_commit(tmp_path / "elsewhere") == "unknown"


def test_bad_options_are_named(capsys, tmp_path):
    assert cmd_bench(_args("--rounds", "0")) == EXIT_CONFIG
    assert "--rounds: Input should be greater than or equal to 1" in capsys.readouterr().err
    assert cmd_bench(_args("--compare", str(tmp_path / "old.json"))) == EXIT_CONFIG
    assert "--compare" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_after_optimize_reuses_every_stage(tiny_config, mlflow_store, capsys, tmp_path):
    import yaml
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName
    from prefect.client.schemas.sorting import TaskRunSort

    from optforge.flows.optimize import optimize

    # The tiny pipeline, 2 epochs, without issue 3's compression chains (they have their own tests).
    raw = yaml.safe_load(tiny_config.read_text())
    raw["train"]["epochs"] = 2
    config = tmp_path / "engines.yaml"
    config.write_text(yaml.safe_dump({**raw, "compress": {"chains": []}}))
    summary = optimize(config_path=str(config))
    rows = {v["variant"]: v for v in summary["variants"]}
    assert {"onnx_int8_static", "onnx_fp16", "trt_fp16", "trt_int8"} <= set(rows)
    assert math.isnan(rows["trt_int8"]["accuracy"]) and rows["onnx_int8_static"]["accuracy"] > 80

    out = tmp_path / "bench.json"
    argv = ["--config", str(config), "--iters-b1", "40", "--iters-batch", "4", "--rounds", "2", "--out", str(out)]
    assert cmd_bench(_args(*argv)) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert set(report["variants"]) == {"pytorch_fp32", "onnx_fp32", "onnx_int8_dynamic", "onnx_int8_static", "onnx_fp16"}
    assert set(report["skipped"]) == {"trt_fp16", "trt_int8"} and "CUDA" in report["skipped"]["trt_fp16"]
    assert {r["comparison"] for r in report["ratios"]} >= {"ORT FP32 / PyTorch eager", "static / dynamic INT8"}
    assert report["machine"]["cpu_count"] and report["settings"]["threads"] == 1 and len(report["code_version"]) == 16
    assert report["variants"]["onnx_fp32"]["runtime"]["graph_optimization"] == "all"
    assert "trt_int8: skipped (CUDA is not available" in printed and "p99 b1 ms" in printed

    client = MlflowClient(mlflow_store)
    run = client.get_run(report["mlflow_run_id"])
    assert run.data.tags["optforge.pipeline"] == "bench" and "ratio.static_dynamic_int8.speedup_p50_b1" in run.data.metrics
    assert all(v == "true" for k, v in run.data.tags.items() if k.startswith("optforge.stage.") and k.endswith(".cached"))
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"bench.json", "bench.txt"}
    with get_client(sync_client=True) as prefect:  # the skip reason is the build_engine task run's state message
        # The two newest build_engine runs are this test's (other tests share the session's Prefect DB).
        cached, built = prefect.read_task_runs(task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_="tensorrt")),
                                               sort=TaskRunSort.EXPECTED_START_TIME_DESC, limit=2)
    assert built.state.name == "Completed" and "skipped trt_fp16, trt_int8: CUDA is not available" in built.state.message
    assert cached.state.name == "Cached"
