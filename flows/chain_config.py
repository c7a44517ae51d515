"""The compression chains' config: which chains to build and each technique's settings.

Config only (no task shells), so loading a pipeline config imports neither Prefect nor MLflow;
``flows.chains`` runs the chains.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from optforge.tasks.techniques.compression.binarize import BinarizeConfig
from optforge.tasks.techniques.compression.circulant import CirculantConfig
from optforge.tasks.techniques.compression.cluster import ClusterConfig
from optforge.tasks.techniques.compression.distill import DistillConfig
from optforge.tasks.techniques.compression.early_exit import EarlyExitConfig
from optforge.tasks.techniques.compression.factorize import FactorizeConfig
from optforge.tasks.techniques.compression.prune import PruneConfig
from optforge.tasks.techniques.compression.qat import QatConfig
from optforge.tasks.techniques.config import TechniqueConfig
from optforge.tasks.techniques.registry import CHAIN_STEPS, chain_problem, expand, variant_name

Stage = Literal[CHAIN_STEPS]  # the registry's chain steps, in its order

# The default shows each technique next to its INT8 version and keeps `optforge run` quick: one Ray
# Train distillation (shared by the first four chains), in-process fine-tuning for QAT, prune and
# factorize, and PyTorch end products that cost only their benchmark. The distilled student alone
# has 1/128 of the teacher's parameters; post-training INT8 costs it about a point, QAT wins it back.
DEFAULT_CHAINS = (("distill",), ("distill", "quantize"), ("distill", "qat"), ("distill", "prune", "quantize"),
                  ("prune",), ("prune", "quantize"), ("factorize",), ("factorize", "quantize"))


class CompressConfig(TechniqueConfig):
    """Which compression chains to build and each technique's settings."""

    chains: tuple[tuple[Stage, ...], ...] = Field(
        DEFAULT_CHAINS, description="chains of stages (distill, prune, factorize, then export or fuse, and/or "
        "quantize); each chain's end product is a benchmarked variant; [] builds none"
    )
    distill: DistillConfig = Field(default_factory=DistillConfig, description="knowledge distillation (Ray Train)")
    prune: PruneConfig = Field(default_factory=PruneConfig, description="pruning and its fine-tuning")
    factorize: FactorizeConfig = Field(default_factory=FactorizeConfig, description="SVD factorization and fine-tuning")
    qat: QatConfig = Field(default_factory=QatConfig, description="quantization-aware fine-tuning, exported as QDQ INT8")
    cluster: ClusterConfig = Field(default_factory=ClusterConfig, description="weight clustering: 2**bits shared "
                                   "values per layer, stored bit-packed")
    binarize: BinarizeConfig = Field(default_factory=BinarizeConfig, description="binary weights (sign x channel "
                                     "scale) for the inner layers, stored one bit each")
    circulant: CirculantConfig = Field(default_factory=CirculantConfig, description="block-circulant Linear layers "
                                       "computed by FFT")
    early_exit: EarlyExitConfig = Field(default_factory=EarlyExitConfig, description="exit heads after intermediate "
                                        "blocks; a confident sample stops early")

    @field_validator("chains")
    @classmethod
    def _chains_make_sense(cls, chains):
        seen = set()
        for i, chain in enumerate(chains):
            if problem := chain_problem(chain):
                raise ValueError(f"chain {i} {list(chain)} {problem}")
            if expand(chain) in seen:
                raise ValueError(f"chain {i} {list(chain)} builds the same variant as an earlier chain")
            seen.add(expand(chain))
        return chains

    @model_validator(mode="after")
    def _no_structured_prune_after_factorize(self):
        for chain in self.chains:
            if "factorize" in chain and "prune" in chain and chain.index("prune") > chain.index("factorize") \
                    and self.prune.method == "structured":
                raise ValueError(f"compress.chains: {list(chain)} prunes structurally after factorizing, which is "
                                 "not supported; put prune before factorize or use prune.method=unstructured")
        return self


def product_name(steps: tuple[str, ...], sep: str = "-") -> str:
    """A chain's variant name (the registry's ``variant_name``): ``distill-prune-int8``."""
    return variant_name(steps, sep)
