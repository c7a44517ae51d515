"""The compression chains' config: which chains to build and each technique's settings.

Config only (no task shells), so loading a pipeline config imports neither Prefect nor MLflow;
``flows.chains`` runs the chains.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from optforge.tasks.techniques.binarize import BinarizeConfig
from optforge.tasks.techniques.circulant import CirculantConfig
from optforge.tasks.techniques.clustering import ClusterConfig
from optforge.tasks.techniques.config import TechniqueConfig
from optforge.tasks.techniques.distill import DistillConfig
from optforge.tasks.techniques.early_exit import EarlyExitConfig
from optforge.tasks.techniques.factorize import FactorizeConfig
from optforge.tasks.techniques.prune import PruneConfig
from optforge.tasks.techniques.qat import QatConfig

Stage = Literal["distill", "prune", "factorize", "cluster", "binarize", "circulant", "early_exit", "export", "fuse",
                "quantize", "static", "qat"]
TORCH_STEPS = ("distill", "prune", "factorize", "cluster", "binarize", "circulant", "early_exit")
# An early-exit model's routing exports as ONNX If nodes: plain export and dynamic INT8 (whose quantizer
# walks If subgraphs) keep it; the fused, static-QDQ and QAT exports build their own graphs without it.
AFTER_EARLY_EXIT = ((), ("export",), ("quantize",), ("export", "quantize"))
SUFFIX = {"export": "onnx", "fuse": "fused", "quantize": "int8", "static": "static_int8", "qat": "qat_int8"}
# What may follow the PyTorch steps: an ONNX export (plain, or fused by ONNX Runtime's transformer
# optimizer, which exports its own graph), then optionally INT8: dynamic (quantize, MatMul-heavy models)
# or static QDQ calibrated as engines.static_int8 says (static, convolutions); or quantization-aware
# fine-tuning, which exports its own QDQ INT8 model.
ONNX_TAILS = ((), ("export",), ("quantize",), ("export", "quantize"), ("fuse",), ("fuse", "quantize"),
              ("static",), ("export", "static"), ("qat",))

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
            where = f"chain {i} {list(chain)}"
            if not any(step in (*TORCH_STEPS, "qat") for step in chain):
                raise ValueError(f"{where} needs at least one of {[*TORCH_STEPS, 'qat']}; export/quantize alone "
                                 "repeat the baseline variants")
            if len(set(chain)) != len(chain):
                raise ValueError(f"{where} repeats a stage")
            torch_steps = [step for step in chain if step in TORCH_STEPS]
            if "early_exit" in torch_steps and torch_steps[-1] != "early_exit":
                raise ValueError(f"{where}: early_exit must be the last PyTorch step (the exit heads are trained for "
                                 "the final backbone)")
            if "circulant" in torch_steps and torch_steps[-1] != "circulant" and torch_steps[-2:] != ["circulant",
                                                                                                       "early_exit"]:
                raise ValueError(f"{where}: circulant must be the last PyTorch step, or be followed by early_exit only "
                                 "(pruning, factorizing, clustering or binarizing a block-circulant layer is not supported)")
            if "distill" in chain and chain[0] != "distill":
                raise ValueError(f"{where}: distill trains a new student from the teacher, so it must come first")
            first_onnx = next((j for j, step in enumerate(chain) if step in SUFFIX), len(chain))
            if tuple(chain[first_onnx:]) not in ONNX_TAILS:
                raise ValueError(f"{where}: export (or fuse) and quantize must come last, in that order, and not "
                                 "both export and fuse")
            if "early_exit" in chain and tuple(chain[first_onnx:]) not in AFTER_EARLY_EXIT:
                raise ValueError(f"{where}: after early_exit only export and quantize (dynamic INT8) keep the exits' "
                                 "routing; fuse, static and qat are not supported")
            if expand(chain) in seen:
                raise ValueError(f"{where} builds the same variant as an earlier chain")
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


def expand(chain) -> tuple[str, ...]:
    """The steps that actually run: INT8 (quantize, static) needs an ONNX model, so it implies export (unless
    fused)."""
    steps = tuple(chain)
    if steps[-1:] in (("quantize",), ("static",)) and "export" not in steps and "fuse" not in steps:
        steps = (*steps[:-1], "export", steps[-1])
    return steps


def product_name(steps: tuple[str, ...], sep: str = "-") -> str:
    """``('distill', 'prune', 'export', 'quantize')`` -> ``distill-prune-int8``; a fused chain keeps ``fused``
    (``distill-fused-int8``) so that it never shares a name with its unfused twin."""
    fused = ["fused"] if "fuse" in steps and steps[-1] != "fuse" else []
    parts = [s for s in steps if s in TORCH_STEPS] + fused + ([SUFFIX[steps[-1]]] if steps[-1] in SUFFIX else [])
    return sep.join(parts)
