"""Choosing the variant to register, and whether it replaces the model in production.

Pure functions over metric dicts, so every rule is tested on hand-made numbers. The rule, in order:

1. Goals. A variant meets them when its accuracy reaches the floor (the baseline's accuracy minus
   ``max_accuracy_drop`` points, or minus that percentage of it when ``accuracy_drop_mode`` is
   ``relative``; never below ``min_accuracy``) and, where set, its latency is at most
   ``max_latency_ms``, its speed-up over the baseline at least ``min_speedup`` and its size at most
   ``max_size_mb``.
2. Portability. Only ``torch`` and ``onnx`` variants can be registered: an engine (TensorRT, TVM, ...)
   runs only on the GPU or CPU model and library version that built it.
3. Pareto. Of the variants passing 1 and 2, those dominated by another such variant on (accuracy,
   latency, size) are dropped. (A variant that dominates one meeting the goals meets them too.)
4. Rank. The best of the rest by ``rank_by``; ties go to higher accuracy, then smaller size, then name.

Promotion (``decide_promotion``): the new version takes the ``champion`` alias when no version
holds it yet, or when it is within the same accuracy gate of the champion's accuracy re-measured on
this run's test data *and* better by ``rank_by`` by more than ``min_improvement`` percent.
Otherwise it gets ``challenger``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Literal, get_args

from pydantic import Field, model_validator

from optforge.tasks.techniques.config import TechniqueConfig
from optforge.tasks.techniques.measurement.pareto import dominator, pareto_front

RankMetric = Literal[
    "latency_ms_p50_b1", "latency_ms_p95_b1", "latency_ms_mean_b1", "throughput_sps_b64", "size_mb", "params", "flops", "accuracy"
]
# Lower is better for each ranking metric except throughput and accuracy.
RANKING = {m: (max if m in ("throughput_sps_b64", "accuracy") else min) for m in get_args(RankMetric)}
# Formats a registry consumer can load anywhere; anything else (engines) is benchmarked but not registered.
PORTABLE_FORMATS = ("torch", "onnx")
CHAMPION, CHALLENGER = "champion", "challenger"


class RegisterConfig(TechniqueConfig):
    """The run's goals, the ranking rule and the registry name (pipeline YAML section ``register:``)."""

    enabled: bool = Field(True, description="register the selected variant in the MLflow Model Registry")
    # A safe name: it ends up in registry URIs and artifact paths, so "/" and a leading "." are refused.
    model_name: str | None = Field(
        None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$",
        description="registered model name (default: from the data and model, e.g. optforge-digits; one name "
        "per kind of input, so a champion is only compared with models of the same data)")
    baseline: str = Field("pytorch_fp32", description="variant whose accuracy and latency the goals compare against")
    max_accuracy_drop: float = Field(
        1.0, ge=0, description="allowed accuracy drop vs the baseline (see accuracy_drop_mode)"
    )
    accuracy_drop_mode: Literal["absolute", "relative"] = Field(
        "absolute",
        description="absolute: drop in accuracy points; relative: drop in percent of the baseline's accuracy",
    )
    min_accuracy: float = Field(
        0.0, ge=0, le=100, description="absolute accuracy floor (%); keeps a bad baseline out too"
    )
    latency_metric: Literal["latency_ms_p50_b1", "latency_ms_p95_b1", "latency_ms_mean_b1"] = Field(
        "latency_ms_p50_b1", description="latency used by max_latency_ms, min_speedup and the Pareto frontier "
        "(mean: the expected latency over the test rows, which is an early-exit model's cost)"
    )
    max_latency_ms: float | None = Field(None, gt=0, description="optional latency target (ms, batch 1)")
    min_speedup: float | None = Field(
        None, gt=0, description="optional minimum speed-up over the baseline (x, batch 1)"
    )
    max_size_mb: float | None = Field(None, gt=0, description="optional maximum model size (MB)")
    rank_by: RankMetric = Field("latency_ms_p50_b1", description="metric that orders the variants meeting the goals")
    min_improvement: float = Field(
        0.0,
        ge=0,
        description="percent by which rank_by must beat the champion's to take its alias (timing noise guard)",
    )

    @model_validator(mode="after")
    def _relative_drop_is_a_percentage(self):
        if self.accuracy_drop_mode == "relative" and self.max_accuracy_drop > 100:
            raise ValueError(
                f"register.max_accuracy_drop: a relative drop is a percentage <= 100, got {self.max_accuracy_drop}"
            )
        return self


@dataclass(frozen=True)
class Selection:
    """What selection decided and why, per variant (the report shows ``verdicts`` as a column)."""

    chosen: str | None
    reason: str
    passing: tuple[str, ...]  # meet the goals, any format
    pareto: tuple[str, ...] = ()  # frontier over all variants of the run (for the report)
    candidates: tuple[str, ...] = ()  # passing, registrable and not dominated among those
    verdicts: dict[str, str] = field(default_factory=dict)
    floor: float = 0.0  # the accuracy floor, %

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Selection:
        tuples = ("passing", "pareto", "candidates")
        return cls(**{k: tuple(v) if k in tuples else v for k, v in d.items() if k in cls.__dataclass_fields__})


def accuracy_floor(reference: float, cfg: RegisterConfig) -> float:
    """Lowest accepted accuracy (%) given a reference accuracy (the baseline's or the champion's)."""
    drop = cfg.max_accuracy_drop if cfg.accuracy_drop_mode == "absolute" else reference * cfg.max_accuracy_drop / 100
    return max(reference - drop, cfg.min_accuracy)


def describe_goals(cfg: RegisterConfig, baseline_accuracy: float) -> str:
    """The goals in words, with the numbers this run used."""
    unit = "points" if cfg.accuracy_drop_mode == "absolute" else "% of it"
    floor = accuracy_floor(baseline_accuracy, cfg)
    parts = [
        (
            f"accuracy >= {floor:.2f}% ({cfg.baseline} {baseline_accuracy:.2f}% minus {cfg.max_accuracy_drop:g} "
            f"{unit}, at least {cfg.min_accuracy:g}%)"
        )
    ]
    if cfg.max_latency_ms is not None:
        parts.append(f"{cfg.latency_metric} <= {cfg.max_latency_ms:g} ms")
    if cfg.min_speedup is not None:
        parts.append(f"speed-up >= {cfg.min_speedup:g}x over {cfg.baseline}")
    if cfg.max_size_mb is not None:
        parts.append(f"size <= {cfg.max_size_mb:g} MB")
    return "; ".join(parts)


def goal_misses(m: dict[str, float], base: dict[str, float], cfg: RegisterConfig) -> list[str]:
    """The goals one variant misses, each in words (empty when it meets them all)."""
    if math.isnan(m["accuracy"]) or math.isnan(m[cfg.latency_metric]):
        return ["not measured here (skipped variant)"]
    misses = []
    floor = accuracy_floor(base["accuracy"], cfg)
    if m["accuracy"] < floor:
        misses.append(f"accuracy {m['accuracy']:.2f}% < {floor:.2f}%")
    lat = m[cfg.latency_metric]
    if cfg.max_latency_ms is not None and lat > cfg.max_latency_ms:
        misses.append(f"{cfg.latency_metric} {lat:.4g} ms > {cfg.max_latency_ms:g} ms")
    if cfg.min_speedup is not None and base[cfg.latency_metric] / lat < cfg.min_speedup:
        misses.append(f"speed-up {base[cfg.latency_metric] / lat:.2f}x < {cfg.min_speedup:g}x")
    if cfg.max_size_mb is not None and m["size_mb"] > cfg.max_size_mb:
        misses.append(f"size {m['size_mb']:.4g} MB > {cfg.max_size_mb:g} MB")
    return misses


def is_measured(m: dict[str, float], cfg: RegisterConfig) -> bool:
    """Whether a variant has the numbers every rule needs (a variant that could not be built here has NaN or none)."""
    return all(
        isinstance(m.get(k), (int, float)) and math.isfinite(m[k]) for k in ("accuracy", "size_mb", cfg.latency_metric)
    )


def _check_inputs(results: dict[str, dict[str, float]], cfg: RegisterConfig) -> None:
    if cfg.baseline not in results:
        raise ValueError(f"register.baseline: variant '{cfg.baseline}' not among {sorted(results)}")
    if not is_measured(results[cfg.baseline], cfg):
        raise ValueError(
            f"register.baseline: variant '{cfg.baseline}' has no accuracy, size or latency to compare with"
        )
    lacking = sorted(
        n for n, m in results.items() if is_measured(m, cfg) and not math.isfinite(m.get(cfg.rank_by, math.nan))
    )
    if lacking:
        raise ValueError(f"register.rank_by: metric '{cfg.rank_by}' is missing for variant(s) {lacking}")


def rank_key(name: str, results: dict[str, dict[str, float]], rank_by: str):
    """Sort key: best ``rank_by`` first, then higher accuracy, smaller size, name (deterministic)."""
    m = results[name]
    sign = 1 if RANKING[rank_by] is min else -1
    return (sign * m[rank_by], -m["accuracy"], m.get("size_mb", 0.0), name)


def select_variant(
    results: dict[str, dict[str, float]], cfg: RegisterConfig, formats: dict[str, str] | None = None
) -> Selection:
    """Apply the module's rule to one run's variants (``formats``: name -> format; default all portable).

    Raises:
        ValueError: the baseline is not among the variants, or a needed metric is missing (names the field).
    """
    _check_inputs(results, cfg)
    formats = formats or {}
    all_results, results = results, {n: m for n, m in results.items() if is_measured(m, cfg)}
    base = results[cfg.baseline]
    floor = accuracy_floor(base["accuracy"], cfg)
    pareto = pareto_front(results, cfg.latency_metric)
    misses = {n: goal_misses(m, base, cfg) for n, m in results.items()}
    passing = tuple(sorted(n for n in results if not misses[n]))
    eligible = [n for n in results if not misses[n] and formats.get(n, "onnx") in PORTABLE_FORMATS]
    candidates = sorted(
        pareto_front(results, cfg.latency_metric, eligible), key=lambda n: rank_key(n, results, cfg.rank_by)
    )
    verdicts = {}
    for n in all_results:
        if n not in results:
            verdicts[n] = f"not measured (format '{formats.get(n, '?')}')"
        elif misses[n]:
            verdicts[n] = "misses goals: " + "; ".join(misses[n])
        elif n not in eligible:
            verdicts[n] = f"meets goals; not registrable: format '{formats[n]}' runs only where it was built"
        elif n not in candidates:
            verdicts[n] = f"dominated by {dominator(n, results, eligible, cfg.latency_metric)}"
        else:
            rank = candidates.index(n) + 1
            verdicts[n] = "selected" if rank == 1 else f"candidate, #{rank} by {cfg.rank_by}"
    goals = describe_goals(cfg, base["accuracy"])
    if not candidates:
        if not passing and all(m["accuracy"] < floor for m in results.values()):
            accuracies = {n: round(m["accuracy"], 2) for n, m in results.items()}
            reason = f"no variant reaches {floor:.2f}% accuracy ({goals}); accuracies: {accuracies}"
        elif not passing:
            reason = f"no variant meets the goals ({goals})"
        else:
            unportable = ", ".join(f"{n} ({formats[n]})" for n in passing)
            reason = f"no registrable variant meets the goals: {unportable} cannot be registered"
        return Selection(None, reason, passing, pareto, (), verdicts, floor)
    best = candidates[0]
    reason = (
        f"{best}: best {cfg.rank_by} ({results[best][cfg.rank_by]:.4g}) among {len(candidates)} candidate(s) "
        f"meeting the goals ({goals})"
    )
    return Selection(best, reason, passing, pareto, tuple(candidates), verdicts, floor)


@dataclass(frozen=True)
class Incumbent:
    """The version holding ``champion``: its accuracy re-measured on this run's test data, its stored metrics."""

    version: str
    accuracy: float | None  # None when it could not be evaluated on this data
    metrics: dict[str, float] = field(default_factory=dict)  # from its model-version tags
    error: str | None = None


@dataclass(frozen=True)
class Promotion:
    alias: str  # CHAMPION or CHALLENGER
    reason: str


def decide_promotion(new: dict[str, float], incumbent: Incumbent | None, cfg: RegisterConfig) -> Promotion:
    """Champion or challenger for a newly registered version (rule in the module docstring)."""
    if incumbent is None:
        return Promotion(CHAMPION, f"first version of {cfg.model_name} to hold '{CHAMPION}'")
    v = f"champion v{incumbent.version}"
    if incumbent.accuracy is None:
        return Promotion(
            CHALLENGER,
            f"{v} could not be evaluated on this data ({incumbent.error}); not replaced "
            f"automatically, move the alias by hand if intended",
        )
    floor = accuracy_floor(incumbent.accuracy, cfg)
    if new["accuracy"] < floor:
        return Promotion(
            CHALLENGER,
            f"accuracy {new['accuracy']:.2f}% is below the gate {floor:.2f}% "
            f"({v} scores {incumbent.accuracy:.2f}% on this data)",
        )
    theirs = incumbent.accuracy if cfg.rank_by == "accuracy" else incumbent.metrics.get(cfg.rank_by)
    if theirs is None:
        return Promotion(CHALLENGER, f"{v} has no recorded {cfg.rank_by} to compare; not replaced automatically")
    ours = new[cfg.rank_by]
    sign = 1 if RANKING[cfg.rank_by] is min else -1
    gain = sign * (theirs - ours)
    gain_pct = 100 * gain / abs(theirs) if theirs else (float("inf") if gain > 0 else 0.0)
    versus = (
        f"{cfg.rank_by} {ours:.4g} vs {theirs:.4g} ({gain_pct:+.1f}%), accuracy {new['accuracy']:.2f}% vs "
        f"{incumbent.accuracy:.2f}% on this data"
    )
    if gain > 0 and gain_pct > cfg.min_improvement:
        return Promotion(CHAMPION, f"beats {v}: {versus}")
    need = f"more than {cfg.min_improvement:g}% better" if cfg.min_improvement else "better"
    return Promotion(CHALLENGER, f"not {need} than {v}: {versus}")
