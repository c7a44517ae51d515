import pytest

from tasks.techniques.selection import RegisterConfig, select_variant


def m(acc, lat, size=1.0, thr=100.0):
    return {"accuracy": acc, "latency_ms_p50_b1": lat, "latency_ms_p95_b1": lat, "size_mb": size, "throughput_sps_b64": thr}


def test_fastest_within_gate_wins():
    results = {"pytorch_fp32": m(97.0, 1.0), "onnx_fp32": m(97.0, 0.5), "onnx_int8_dynamic": m(95.5, 0.2)}
    assert select_variant(results, RegisterConfig()).chosen == "onnx_fp32"
    assert select_variant(results, RegisterConfig(max_accuracy_drop=2.0)).chosen == "onnx_int8_dynamic"


def test_none_passing_and_tie():
    results = {"pytorch_fp32": m(97.0, 1.0), "a": m(90.0, 0.1)}
    assert select_variant(results, RegisterConfig()).chosen == "pytorch_fp32"  # "a" is faster but 7 points worse
    none = select_variant(results, RegisterConfig(min_accuracy=98.0))
    assert none.chosen is None and none.passing == () and "98.00%" in none.reason
    tie = {"pytorch_fp32": m(97.0, 1.0), "b": m(97.5, 1.0), "c": m(97.2, 1.0)}
    assert select_variant(tie, RegisterConfig()).chosen == "b"  # same latency: more accurate wins


def test_rank_by_throughput_is_higher_better():
    results = {"pytorch_fp32": m(97.0, 1.0, thr=100), "x": m(97.0, 2.0, thr=500)}
    assert select_variant(results, RegisterConfig(rank_by="throughput_sps_b64")).chosen == "x"


def test_unknown_baseline():
    with pytest.raises(ValueError, match="register.baseline"):
        select_variant({"a": m(1, 1)}, RegisterConfig())
