"""Choosing the variant to register: the best-ranked one whose accuracy stays within the gate.

Pure function over metric dicts, so every rule is tested on hand-made numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import Field

from tasks.techniques.config import TechniqueConfig

# Lower is better for each ranking metric except throughput.
RANKING = {"latency_ms_p50_b1": min, "latency_ms_p95_b1": min, "size_mb": min, "throughput_sps_b64": max}


class RegisterConfig(TechniqueConfig):
    """Which variant is registered, and under which name."""

    enabled: bool = Field(True, description="register the selected variant in the MLflow Model Registry")
    model_name: str = Field("optforge-digits", min_length=1, description="registered model name")
    baseline: str = Field("pytorch_fp32", description="variant whose accuracy the gate compares against")
    max_accuracy_drop: float = Field(1.0, ge=0, description="allowed accuracy drop vs the baseline, in points")
    min_accuracy: float = Field(0.0, ge=0, le=100, description="absolute accuracy floor (%); keeps a bad baseline out too")
    rank_by: Literal["latency_ms_p50_b1", "latency_ms_p95_b1", "size_mb", "throughput_sps_b64"] = Field(
        "latency_ms_p50_b1", description="metric that orders the variants that pass the gate"
    )


@dataclass(frozen=True)
class Selection:
    chosen: str | None
    reason: str
    passing: tuple[str, ...]


def select_variant(results: dict[str, dict[str, float]], cfg: RegisterConfig) -> Selection:
    """Best variant by ``cfg.rank_by`` among those within ``cfg.max_accuracy_drop`` of the baseline.

    Ties on the ranking metric go to the more accurate variant, then to the name (deterministic).
    """
    if cfg.baseline not in results:
        raise ValueError(f"register.baseline: variant '{cfg.baseline}' not among {sorted(results)}")
    floor = max(results[cfg.baseline]["accuracy"] - cfg.max_accuracy_drop, cfg.min_accuracy)
    passing = tuple(sorted(n for n, m in results.items() if m["accuracy"] >= floor))
    if not passing:
        accuracies = {n: round(m["accuracy"], 2) for n, m in results.items()}
        return Selection(
            None,
            f"no variant reaches {floor:.2f}% accuracy (within {cfg.max_accuracy_drop} points of {cfg.baseline} "
            f"and at least register.min_accuracy={cfg.min_accuracy}); accuracies: {accuracies}",
            (),
        )
    sign = 1 if RANKING[cfg.rank_by] is min else -1
    best = min(passing, key=lambda n: (sign * results[n][cfg.rank_by], -results[n]["accuracy"], n))
    reason = (
        f"{best}: best {cfg.rank_by} ({results[best][cfg.rank_by]:.4g}) among {len(passing)} variant(s) within "
        f"{cfg.max_accuracy_drop} accuracy points of {cfg.baseline}"
    )
    return Selection(best, reason, passing)
