"""Side-by-side benchmark harness: every variant timed in one process, interleaved, then compared as ratios.

Timing variants one after another lets drift (CPU frequency, a neighbour's load) land on whichever
ran last. Here each variant's timed calls are split into rounds and the rounds interleave, in a
rotating order, so drift spreads over all of them. The ratios answer the questions that matter
(is ORT faster than eager PyTorch? is INT8 faster than FP32, and at what accuracy cost?) and the
report is plain JSON so runs on different commits can be compared.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from pydantic import Field

from optforge.tasks.techniques.config import TechniqueConfig
from optforge.tasks.techniques.measurement.benchmark import time_calls, timing_rows
from optforge.tasks.techniques.measurement.metrics import Predictor, part_accuracy

BASELINE = "pytorch_fp32"
# (label, variant, reference): the ratio is variant vs reference; "best" is resolved per report.
COMPARISONS = (
    ("ORT FP32 / PyTorch eager", "onnx_fp32", "pytorch_fp32"),
    ("dynamic INT8 / ORT FP32", "onnx_int8_dynamic", "onnx_fp32"),
    ("static INT8 / ORT FP32", "onnx_int8_static", "onnx_fp32"),
    ("static / dynamic INT8", "onnx_int8_static", "onnx_int8_dynamic"),
    ("best / baseline", "best", BASELINE),
)


@dataclass(frozen=True)
class Target:
    """A goal on one ratio: ``metric >= minimum`` and, where set, an accuracy drop of at most ``max_drop`` points."""

    comparison: str
    metric: str
    minimum: float
    max_drop: float | None = None


# The issue's CPU targets for the default model.
TARGETS = (
    Target("ORT FP32 / PyTorch eager", "speedup_p50_b1", 1.3),
    Target("static INT8 / ORT FP32", "throughput_ratio_b64", 1.5, max_drop=1.0),
)


class HarnessConfig(TechniqueConfig):
    """How the harness times variants (``optforge bench`` options)."""

    RENAMED = {"max_accuracy_drop": "best_within"}

    iters_b1: int = Field(500, ge=10, description="timed batch-1 calls per variant (p50/p95/p99)")
    iters_batch: int = Field(60, ge=1, description="timed calls at batch_size per variant")
    batch_size: int = Field(64, ge=1, description="batch of the throughput measurement")
    rounds: int = Field(5, ge=1, description="interleaved rounds the timed calls are split into")
    warmup: int = Field(20, ge=0, description="untimed calls per variant and batch size before timing")
    best_within: float = Field(1.0, ge=0, description="accuracy points below the baseline a variant may be and still "
                               "be called 'best' in the report (a ranking rule, not the registry's gate)")


def machine_info() -> dict:
    """What the numbers depend on besides the code: CPU, core count, library versions."""
    import os
    import platform

    import onnxruntime
    import torch

    from optforge.tasks.techniques.measurement.benchmark import cpu_model

    return {"cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "machine": platform.machine(),
            "python": platform.python_version(), "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "numpy": np.__version__}


def _chunks(total: int, parts: int) -> list[int]:
    return [total // parts + (i < total % parts) for i in range(parts)]


def measure_side_by_side(predictors: dict[str, Predictor], part, cfg: HarnessConfig) -> dict[str, dict[str, float]]:
    """Accuracy, p50/p95/p99 batch-1 latency (ms) and throughput at ``batch_size`` for every predictor on ``part``."""
    if len(part) == 0:
        raise ValueError("harness: the test split is empty")
    names = list(predictors)
    accuracy = {n: part_accuracy(predictors[n], part) for n in names}
    batch = part.take(np.arange(cfg.batch_size))
    for n in names:
        time_calls(predictors[n], timing_rows(part, cfg.warmup) + [batch] * cfg.warmup)
    lat = {n: [] for n in names}
    batch_seconds = dict.fromkeys(names, 0.0)
    b1_rounds, batch_rounds = _chunks(cfg.iters_b1, cfg.rounds), _chunks(cfg.iters_batch, cfg.rounds)
    for r in range(cfg.rounds):
        rows = timing_rows(part, b1_rounds[r], offset=r * 997)
        for n in names[r % len(names) :] + names[: r % len(names)]:  # rotate who goes first
            lat[n] += list(time_calls(predictors[n], rows))
            batch_seconds[n] += float(time_calls(predictors[n], [batch] * batch_rounds[r]).sum())
    out = {}
    for n in names:
        ms = np.asarray(lat[n]) * 1e3
        out[n] = {"accuracy": accuracy[n], "latency_ms_p50_b1": float(np.percentile(ms, 50)),
                  "latency_ms_p95_b1": float(np.percentile(ms, 95)), "latency_ms_p99_b1": float(np.percentile(ms, 99)),
                  "throughput_sps_b64": cfg.batch_size * cfg.iters_batch / batch_seconds[n]}
    return out


def best_variant(metrics: dict[str, dict[str, float]], max_drop: float) -> str | None:
    """Fastest (p50, batch 1) variant within ``max_drop`` accuracy points of the baseline."""
    if BASELINE not in metrics:
        return None
    floor = metrics[BASELINE]["accuracy"] - max_drop
    ok = [n for n, m in metrics.items() if m["accuracy"] >= floor]
    return min(ok, key=lambda n: metrics[n]["latency_ms_p50_b1"]) if ok else None


def ratios(metrics: dict[str, dict[str, float]], max_drop: float = 1.0) -> list[dict]:
    """Each comparison whose two variants were measured: speed-ups at batch 1, throughput ratio, accuracy delta."""
    best = best_variant(metrics, max_drop)
    out = []
    for label, variant, reference in COMPARISONS:
        variant = best if variant == "best" else variant
        if variant not in metrics or reference not in metrics:
            continue
        v, r = metrics[variant], metrics[reference]
        out.append({"comparison": label, "variant": variant, "reference": reference,
                    "speedup_p50_b1": r["latency_ms_p50_b1"] / v["latency_ms_p50_b1"],
                    "speedup_p99_b1": r["latency_ms_p99_b1"] / v["latency_ms_p99_b1"],
                    "throughput_ratio_b64": v["throughput_sps_b64"] / r["throughput_sps_b64"],
                    "accuracy_delta": v["accuracy"] - r["accuracy"]})
    return out


def verdicts(rows: list[dict], targets: tuple[Target, ...] = TARGETS) -> list[dict]:
    """Each target, met or missed, with the measured value (``None`` when its comparison was not measured)."""
    by_label = {r["comparison"]: r for r in rows}
    out = []
    for t in targets:
        row = by_label.get(t.comparison)
        value = row[t.metric] if row else None
        drop = 0.0 - row["accuracy_delta"] if row else None  # 0.0 - x: no "-0.00" when nothing changed
        met = value is not None and value >= t.minimum and (t.max_drop is None or drop <= t.max_drop)
        out.append({**asdict(t), "value": value, "accuracy_drop": drop, "met": met})
    return out


def _table(header: tuple[str, ...], rows: list[tuple]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def fmt(r) -> str:
        return "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths)))

    return [fmt(header), fmt(["-" * w for w in widths]), *map(fmt, rows)]


def _num(v, spec: str) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def format_report(report: dict, previous: dict | None = None) -> str:
    """The report as text: machine line, variants, ratios (with a previous run's values), target verdicts."""
    m = report["machine"]
    head = (f"CPU {m['cpu_model']} ({m['cpu_count']} cores), {report['settings']['threads']} intra-op thread(s), "
            f"ORT graph optimization '{report['settings']['graph_optimization']}', torch {m['torch']}, "
            f"onnxruntime {m['onnxruntime']}, commit {report['commit'][:12]} (code {report['code_version']})")
    lines = [head, ""]
    rows = [(n, _num(v["accuracy"], ".2f"), _num(v["latency_ms_p50_b1"], ".3f"), _num(v["latency_ms_p95_b1"], ".3f"),
             _num(v["latency_ms_p99_b1"], ".3f"), _num(v["throughput_sps_b64"], ",.0f"), _num(v.get("size_mb"), ".2f"))
            for n, v in report["variants"].items()]
    lines += _table(("variant", "acc %", "p50 b1 ms", "p95 b1 ms", "p99 b1 ms", "thr b64 /s", "size MB"), rows)
    lines += [f"{n}: skipped ({why})" for n, why in report.get("skipped", {}).items()]
    lines += [f"{n}: failed ({why})" for n, why in report.get("failed", {}).items()]
    old = {r["comparison"]: r for r in (previous or {}).get("ratios", [])}
    rows = []
    for r in report["ratios"]:
        row = (f"{r['comparison']} ({r['variant']} vs {r['reference']})", _num(r["speedup_p50_b1"], ".2f") + "x",
               _num(r["speedup_p99_b1"], ".2f") + "x", _num(r["throughput_ratio_b64"], ".2f") + "x",
               _num(r["accuracy_delta"], "+.2f"))
        if previous is not None:
            was = old.get(r["comparison"], {})
            row += (_num(was.get("speedup_p50_b1"), ".2f") + "x", _num(was.get("throughput_ratio_b64"), ".2f") + "x")
        rows.append(row)
    header = ("ratio", "p50 b1", "p99 b1", "thr b64", "d acc pts")
    if previous is not None:
        header += (f"was p50 b1 ({previous.get('commit', '?')[:8]})", "was thr b64")
    lines += ["", *_table(header, rows), ""]
    for v in report["targets"]:
        extra = f", accuracy drop {_num(v['accuracy_drop'], '.2f')} <= {v['max_drop']}" if v["max_drop"] is not None else ""
        lines.append(f"target {v['comparison']} {v['metric']} >= {v['minimum']}{extra}: "
                     f"{_num(v['value'], '.2f')} -> {'MET' if v['met'] else 'MISSED'}")
    return "\n".join(lines)
