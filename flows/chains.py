"""Compression chains: distill / prune / factorize, then export and quantize each chain's product.

Owned by issue 3's work; the optimize flow calls ``chain_variants`` after the baseline variants.
"""

from __future__ import annotations

from tasks.refs import DataRef, ModelRef
from tasks.techniques.config import TechniqueConfig


class CompressConfig(TechniqueConfig):
    """Which compression chains to build and each technique's settings."""


def chain_variants(cfg: CompressConfig, teacher: ModelRef, data: DataRef, workdir: str, stage,
                   export_cfg, quantize_cfg) -> list[ModelRef]:
    """Run each configured chain through ``stage`` (the flow's StageRunner); return the end products."""
    return []
