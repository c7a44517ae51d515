"""The search's config (``tune:``): which chains and settings to try, how many trials, when to stop one.

Config only, like ``chain_config``: loading a pipeline config imports neither Ray nor Prefect. A trial is
one chain over the trained teacher with one value picked for each key of the space; ``trial_overrides``
turns a trial into the ``KEY=VALUE`` overrides that ``optforge run --set`` takes, so a trial's variant is
rebuilt exactly by ``optforge run`` with the same overrides and ``compress.chains`` set to its chain.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator

from optforge.flows.chain_config import CompressConfig, Stage, expand
from optforge.tasks.techniques.config import TechniqueConfig
from optforge.tasks.techniques.registry import CHAIN_STEPS, TECHNIQUES

# Sections a trial may change: those the chain steps read (the registry's config keys). The teacher (data,
# model, train) is trained once before the search and shared by every trial, so its settings are not searchable.
SEARCHABLE = tuple(f"{TECHNIQUES[step].config_key}." for step in CHAIN_STEPS)

# The chain menu when ``tune.chains`` is not given: each technique with the INT8 forms a CPU runs fast
# (dynamic, static, quantization-aware), and the two-step chains that combine them. The plan drops those
# that cannot apply to the model (a fuse for a non-transformer, a distill whose student cannot be built).
TUNE_CHAINS: tuple[tuple[str, ...], ...] = (
    ("distill", "quantize"), ("distill", "qat"), ("distill", "static"), ("distill", "prune", "quantize"),
    ("prune", "quantize"), ("prune", "static"), ("factorize", "quantize"), ("factorize", "static"),
    ("distill", "fuse", "quantize"), ("fuse", "quantize"))


class TuneConfig(TechniqueConfig):
    """The search over compression chains and their settings (``optforge tune``)."""

    trials: int = Field(8, ge=1, le=10_000, description="distinct trials to draw (fewer when the space holds "
                        "fewer); the flow hands them to Ray Tune as a grid")
    time_budget_s: float | None = Field(None, gt=0, description="wall-time budget of the search in seconds; trials "
                                        "still running then are stopped (None: no limit)")
    max_concurrent: int = Field(2, ge=1, description="trials building at once; their latency is still measured one "
                                "at a time (see README: How tune times trials)")
    chains: tuple[tuple[Stage, ...], ...] | None = Field(
        None, description="chain shapes to choose from, as compress.chains (None: a menu of every technique with "
        "its INT8 forms, less what the plan finds cannot apply)")
    space: dict[str, list[Any]] | None = Field(
        None, description="dotted config key -> the values to try, e.g. {compress.prune.sparsity: [0.3, 0.5, 0.7]} "
        f"(keys under {', '.join(SEARCHABLE)}; None: defaults scaled to the model, see default_space)")
    scheduler: Literal["floor", "none"] = Field(
        "floor", description="floor: stop a trial whose fine-tuning cannot reach the accuracy floor; none: run all")
    stop_margin: float = Field(1.0, ge=0, description="floor scheduler: validation-accuracy points below the floor "
                               "that a trial may still be at the end of a fine-tuning phase before it is stopped")
    seed: int = Field(0, description="seed of the random search (the same seed draws the same trials)")

    @field_validator("chains")
    @classmethod
    def _chains_are_chains(cls, chains):
        if chains is not None:
            if not chains:
                raise ValueError("give at least one chain, or leave it unset for the default menu")
            try:  # the same rules as compress.chains, with its messages
                CompressConfig(chains=chains)
            except ValidationError as exc:
                raise ValueError("; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())) from None
        return chains

    @field_validator("space")
    @classmethod
    def _space_keys(cls, space):
        for key, values in (space or {}).items():
            if not key.startswith(SEARCHABLE):
                raise ValueError(f"{key}: only keys under {', '.join(SEARCHABLE)} can be searched (the teacher is "
                                 "trained once, before the search)")
            if key == "compress.chains":
                raise ValueError("compress.chains: give chain shapes as tune.chains")
            if not values:
                raise ValueError(f"{key}: give at least one value to try")
        return space


def default_space(cfg) -> dict[str, list[Any]]:
    """The settings searched when ``tune.space`` is unset, scaled to the model ``cfg`` trains.

    The registry's search values for every model (pruning ratio and rounds, SVD energy, the static-INT8
    calibration method and per-channel scales); the student's size: for the zoo MLP, fractions of the teacher's widths; for a student derived
    from the teacher, the share of layers (``derive: layers``) or of every layer's channels (``derive: width``).
    """
    space: dict[str, list[Any]] = {f"{t.config_key}.{key}": list(values)
                                   for t in TECHNIQUES.values() for key, values in t.search.items()}
    model, student = cfg.model, cfg.compress.distill.student
    if model.arch == "mlp" and student.arch == "mlp" and cfg.compress.distill.derive == "none":
        widest = max(model.hidden or (64,))
        space["compress.distill.student.hidden"] = [
            [max(8, widest // d), max(8, widest // (2 * d))] for d in (32, 16, 8)]
    if cfg.compress.distill.derive == "layers":
        space["compress.distill.layer_stride"] = [2, 3]
    if cfg.compress.distill.derive == "width":
        space["compress.distill.width_keep"] = [0.25, 0.5, 0.75]
    return space


def trial_overrides(values: dict[str, Any]) -> list[str]:
    """A trial's picked values as ``KEY=VALUE`` overrides (YAML values, as ``--set`` parses them)."""
    return [f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"
            for key, value in sorted(values.items())]


def relevant(key: str, chain) -> bool:
    """Whether ``key`` changes what ``chain`` builds: it lies in the section of a step that runs (the implied
    export included)."""
    return any(key.startswith(f"{TECHNIQUES[step].config_key}.") for step in expand(tuple(chain)))


def draw_trials(chains, space: dict[str, list[Any]], trials: int, seed: int,
                allowed: Callable[[tuple, dict], bool] | None = None) -> list[dict[str, Any]]:
    """``trials`` distinct trials (chain + a value for each key that matters to it), drawn at random with ``seed``.

    Each draw picks a chain first (uniformly among those with untried settings left), then one of its
    untried settings, so a chain with many settings does not crowd out the others. Keys that do not touch
    a chain are left out of its trials: two draws that differ only there are one trial. Fewer come back
    when the space holds fewer distinct trials. ``allowed(chain, values)``, when given, drops the trials that
    cannot apply (a student no smaller than the teacher).
    """
    import itertools
    import random

    rng = random.Random(seed)
    left = []
    for chain in chains:
        keys = sorted(k for k in space if relevant(k, chain))
        combos = [dict(zip(keys, combo)) for combo in itertools.product(*(space[k] for k in keys))]
        combos = [c for c in combos if allowed is None or allowed(tuple(chain), c)]
        rng.shuffle(combos)
        left.append((list(chain), combos))
    drawn = []
    while len(drawn) < trials and any(combos for _, combos in left):
        chain, combos = rng.choice([entry for entry in left if entry[1]])
        drawn.append({"chain": chain, "values": combos.pop()})
    return drawn
