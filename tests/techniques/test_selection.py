"""Selection and promotion rules on hand-made metric sets (pure, milliseconds)."""

import json

import pytest
import yaml
from pydantic import ValidationError

from optforge.tasks.techniques.measurement.pareto import dominates, pareto_front
from optforge.tasks.techniques.measurement.selection import (
    CHALLENGER,
    CHAMPION,
    Incumbent,
    RegisterConfig,
    Selection,
    accuracy_floor,
    decide_promotion,
    select_variant,
)

LAT = "latency_ms_p50_b1"


def m(acc, lat, size=1.0, thr=100.0, params=1000.0):
    return {
        "accuracy": acc,
        LAT: lat,
        "latency_ms_p95_b1": lat * 1.2,
        "size_mb": size,
        "throughput_sps_b64": thr,
        "params": params,
    }


def test_fastest_within_gate_wins():
    results = {"pytorch_fp32": m(97.0, 1.0), "onnx_fp32": m(97.0, 0.5), "onnx_int8_dynamic": m(95.5, 0.2, 0.3)}
    assert select_variant(results, RegisterConfig()).chosen == "onnx_fp32"
    assert select_variant(results, RegisterConfig(max_accuracy_drop=2.0)).chosen == "onnx_int8_dynamic"


def test_tie_goes_to_accuracy_then_size_then_name():
    tie = {"pytorch_fp32": m(97.0, 1.0), "b": m(97.5, 0.5), "c": m(97.2, 0.5)}
    sel = select_variant(tie, RegisterConfig())
    assert sel.chosen == "b" and sel.verdicts["c"] == "dominated by b"  # same latency, less accurate
    exact = {"pytorch_fp32": m(97.0, 1.0), "y": m(97.0, 0.5), "x": m(97.0, 0.5)}
    sel = select_variant(exact, RegisterConfig())
    assert sel.chosen == "x" and sel.candidates == ("x", "y")  # identical points: both on the frontier, name decides


def test_none_passing_says_so_plainly():
    results = {"pytorch_fp32": m(97.0, 1.0), "a": m(90.0, 0.1)}
    assert select_variant(results, RegisterConfig()).chosen == "pytorch_fp32"  # "a" is faster but 7 points worse
    none = select_variant(results, RegisterConfig(min_accuracy=98.0))
    assert none.chosen is None and none.passing == () and "no variant reaches 98.00%" in none.reason
    slow = select_variant(results, RegisterConfig(max_latency_ms=0.05))
    assert slow.chosen is None and slow.reason.startswith("no variant meets the goals")
    assert "latency_ms_p50_b1 1 ms > 0.05 ms" in slow.verdicts["pytorch_fp32"]


def test_dominated_variant_is_never_chosen():
    # "fat" has the best throughput but is dominated by "lean" (as accurate, faster, smaller).
    results = {
        "pytorch_fp32": m(97.0, 2.0, 10, thr=100),
        "lean": m(97.0, 0.5, 1, thr=500),
        "fat": m(96.9, 0.6, 5, thr=900),
    }
    sel = select_variant(results, RegisterConfig(rank_by="throughput_sps_b64"))
    assert sel.chosen == "lean" and "fat" not in sel.candidates and sel.verdicts["fat"] == "dominated by lean"
    assert sel.pareto == ("lean",)
    assert dominates(results["lean"], results["fat"], LAT) and not dominates(results["lean"], results["lean"], LAT)


def test_pareto_front_over_three_objectives():
    pts = {"acc": m(99, 3, 9), "fast": m(90, 1, 9), "small": m(90, 3, 1), "worse": m(89, 3, 9)}
    assert pareto_front(pts, LAT) == ("acc", "fast", "small")
    assert pareto_front(pts, LAT, among=["fast", "worse"]) == ("fast",)


def test_relative_versus_absolute_gate():
    results = {"pytorch_fp32": m(80.0, 1.0), "q": m(79.0, 0.2)}  # 1 point = 1.25% of 80
    assert accuracy_floor(80.0, RegisterConfig(max_accuracy_drop=1.0)) == 79.0
    assert accuracy_floor(80.0, RegisterConfig(max_accuracy_drop=1.0, accuracy_drop_mode="relative")) == 79.2
    assert select_variant(results, RegisterConfig(max_accuracy_drop=1.0)).chosen == "q"
    relative = select_variant(results, RegisterConfig(max_accuracy_drop=1.0, accuracy_drop_mode="relative"))
    assert relative.chosen == "pytorch_fp32" and "79.00% < 79.20%" in relative.verdicts["q"]
    assert select_variant(results, RegisterConfig(max_accuracy_drop=1.25, accuracy_drop_mode="relative")).chosen == "q"


def test_speedup_and_size_goals():
    results = {"pytorch_fp32": m(97.0, 1.0, 20), "a": m(97.0, 0.6, 5), "b": m(96.8, 0.4, 25)}
    assert select_variant(results, RegisterConfig(max_size_mb=10)).chosen == "a"
    sel = select_variant(results, RegisterConfig(min_speedup=2.0))
    assert sel.chosen == "b" and "speed-up 1.67x < 2x" in sel.verdicts["a"]


def test_non_portable_formats_are_never_registered():
    results = {"pytorch_fp32": m(97.0, 1.0), "trt_fp16": m(97.0, 0.1), "onnx_fp32": m(97.0, 0.5)}
    formats = {"pytorch_fp32": "torch", "trt_fp16": "tensorrt", "onnx_fp32": "onnx"}
    sel = select_variant(results, RegisterConfig(), formats)
    assert sel.chosen == "onnx_fp32" and "not registrable" in sel.verdicts["trt_fp16"]
    assert "trt_fp16" in sel.pareto  # shown on the frontier, just not registrable
    only_trt = select_variant(results, RegisterConfig(max_latency_ms=0.2), formats)
    assert only_trt.chosen is None and "trt_fp16 (tensorrt) cannot be registered" in only_trt.reason


def test_selection_round_trips_through_json():
    sel = select_variant({"pytorch_fp32": m(97.0, 1.0), "a": m(96.0, 0.5)}, RegisterConfig())
    assert Selection.from_dict(json.loads(json.dumps(sel.to_dict()))) == sel


def test_config_round_trips_and_bad_values_name_the_field():
    cfg = RegisterConfig(accuracy_drop_mode="relative", max_latency_ms=2.5, rank_by="size_mb")
    assert RegisterConfig.from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict()))) == cfg
    with pytest.raises(ValidationError, match="rank_by"):
        RegisterConfig(rank_by="latency_ms_p99")
    with pytest.raises(ValidationError, match="max_accuracy_drop"):
        RegisterConfig(max_accuracy_drop=-1)
    with pytest.raises(ValidationError, match="register.max_accuracy_drop: a relative drop is a percentage"):
        RegisterConfig(max_accuracy_drop=150, accuracy_drop_mode="relative")
    with pytest.raises(ValidationError, match="min_speedup"):
        RegisterConfig(min_speedup=0)


def test_bad_inputs_name_the_field():
    with pytest.raises(ValueError, match="register.baseline"):
        select_variant({"a": m(1, 1)}, RegisterConfig())
    results = {"pytorch_fp32": m(97, 1), "a": m(97, 0.5)}
    with pytest.raises(ValueError, match=r"register.rank_by: metric 'flops' is missing for variant\(s\)"):
        select_variant(results, RegisterConfig(rank_by="flops"))


def test_promotion_rules():
    cfg = RegisterConfig(model_name="m")
    assert decide_promotion(m(97, 1.0), None, cfg).alias == CHAMPION  # first model of a name
    champ = Incumbent("1", 97.0, {LAT: 1.0})
    better = decide_promotion(m(96.5, 0.5), champ, cfg)
    assert better.alias == CHAMPION and "beats champion v1" in better.reason
    assert decide_promotion(m(97.0, 1.5), champ, cfg).alias == CHALLENGER  # slower
    assert decide_promotion(m(97.0, 1.0), champ, cfg).alias == CHALLENGER  # equal is not better
    gated = decide_promotion(m(95.0, 0.1), champ, cfg)
    assert gated.alias == CHALLENGER and "below the gate 96.00%" in gated.reason
    noisy = decide_promotion(m(97.0, 0.97), champ, RegisterConfig(min_improvement=5))
    assert noisy.alias == CHALLENGER and "more than 5% better" in noisy.reason
    assert decide_promotion(m(97.0, 0.9), champ, RegisterConfig(min_improvement=5)).alias == CHAMPION
    broken = decide_promotion(m(99, 0.1), Incumbent("2", None, {}, "ValueError: 64 features expected"), cfg)
    assert broken.alias == CHALLENGER and "could not be evaluated" in broken.reason
    untagged = decide_promotion(m(99, 0.1), Incumbent("3", 97.0, {}), cfg)
    assert untagged.alias == CHALLENGER and "no recorded latency_ms_p50_b1" in untagged.reason
    by_acc = RegisterConfig(rank_by="accuracy")
    assert decide_promotion(m(97.5, 9.0), Incumbent("4", 97.0, {}), by_acc).alias == CHAMPION  # re-measured accuracy


def test_unmeasured_variants_are_shown_but_never_chosen():
    nan = float("nan")
    results = {"pytorch_fp32": m(97.0, 1.0), "trt_fp16": m(nan, nan, nan) | {"params": 10.0}, "trt_int8": {}}
    formats = {"pytorch_fp32": "torch", "trt_fp16": "skipped", "trt_int8": "skipped"}
    sel = select_variant(results, RegisterConfig(), formats)
    assert sel.chosen == "pytorch_fp32" and sel.pareto == ("pytorch_fp32",) and sel.passing == ("pytorch_fp32",)
    assert sel.verdicts["trt_fp16"] == sel.verdicts["trt_int8"] == "not measured (format 'skipped')"
    with pytest.raises(ValueError, match="register.baseline: variant 'trt_int8' has no accuracy"):
        select_variant(results, RegisterConfig(baseline="trt_int8"), formats)
